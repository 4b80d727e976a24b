"""The server with a multi-vector (ColBERT) model, beside an embedder and a reranker, on loopback:
`/v1/embeddings` with `input_type` (or PyLate's `is_query`) returning per-token vectors equal to
`MultiVectorEncoder.encode_query` / `encode_document` (float and base64), `/rerank` and
`/v1/rerank` scored by MaxSim equal to `MultiVectorEncoder.rank`; which model a request reaches;
bad input; queries (with their expansion's key lengths) and documents of many requests in one
forward; overload; a client that leaves.

Random folders in PyLate's layout (tests/multivector_data.py): "expand" (query expansion with
unattended [MASK]s, GTE-ModernColBERT's) and "no-expansion"."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra)")

from multivector_data import DOCUMENTS, QUERIES, write_variants  # noqa: E402
from modernbert_embed import CrossEncoder, Embedder, MultiVectorEncoder  # noqa: E402
from test_server import _post, hang_up_while_held, running, spy_on, wait_for  # noqa: E402
from test_server_rerank import _write  # noqa: E402
from helpers import REAL_VOCAB  # noqa: E402
from modernbert_embed.weights import classifier_config  # noqa: E402

QUERY = "what is late interaction?"


@pytest.fixture(scope="module")
def cols(tmp_path_factory):
    folders = write_variants(tmp_path_factory.mktemp("colbert"))
    return {"col": MultiVectorEncoder.from_pretrained(folders["expand"], device="cpu"),
            "plain": MultiVectorEncoder.from_pretrained(folders["no-expansion"], device="cpu")}


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    return {"emb": Embedder.from_pretrained(_write(tmp_path_factory, "emb", REAL_VOCAB, 11), device="cpu"),
            "rr": CrossEncoder.from_pretrained(_write(tmp_path_factory, "rr", classifier_config(REAL_VOCAB,
                                                                                                 num_labels=1), 3),
                                               device="cpu")}


@pytest.fixture(scope="module")
def live(cols, others):
    """An embedder, a reranker and a ColBERT model (query expansion, unattended)."""
    with running([others["emb"], others["rr"], cols["col"]], served_model_name=("emb", "rr", "col"),
                 max_client_batch_size=8) as s:
        yield s


@pytest.fixture(scope="module")
def plain(cols):
    """A ColBERT model without query expansion, alone."""
    with running(cols["plain"], served_model_name="plain") as s:
        yield s


def close(got, want, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=what)


def vectors(body) -> list[np.ndarray]:
    return [np.asarray(d["embedding"], dtype=np.float32) for d in sorted(body["data"], key=lambda d: d["index"])]


def server_of(s, name):
    return s.state.by_name[name] if name in s.state.by_name else s.state.primary


def spied(s, name):
    """A gate in front of the model `name`'s `tokens` (`test_server.Spy`), recording (ids, key
    lengths) per call; `hold` asks for a document's vectors."""
    return spy_on(server_of(s, name).batcher, method="tokens",
                  hold_request=("/v1/embeddings", {"model": name, "input": "hold", "input_type": "document"}),
                  record=lambda ids, kw: ([list(x) for x in ids],
                                          None if kw.get("key_lengths") is None else list(kw["key_lengths"])))


# ----------------------------------------------------------------------------- vectors
@pytest.mark.parametrize("which", ["col", "plain"])
def test_query_and_document_vectors_equal_the_encoder(live, plain, cols, which):
    s, enc = (live, cols["col"]) if which == "col" else (plain, cols["plain"])
    for input_type, texts, want in (("query", QUERIES, enc.encode_query(QUERIES)),
                                    ("document", DOCUMENTS, enc.encode_document(DOCUMENTS))):
        r = s.http.post("/v1/embeddings", json={"model": which, "input": texts, "input_type": input_type})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == which and body["object"] == "list"
        got = vectors(body)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{input_type} {i}")
        ids = enc.tokenize(texts, is_query=input_type == "query")[0]
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(len(x) for x in ids)
        assert r.headers["x-truncated-inputs"] == "1"  # the long query, the long document
    if which == "col":  # expanded to query_length, one vector per position
        assert {len(v) for v in vectors(s.http.post("/v1/embeddings", json={
            "model": "col", "input": QUERIES, "input_type": "query"}).json())} == {enc.query_length}


def test_base64_is_float32_row_major_and_the_openai_client_reads_it(live, cols):
    enc = cols["col"]
    want = enc.encode_document(DOCUMENTS)
    r = live.http.post("/v1/embeddings", json={"model": "col", "input": DOCUMENTS, "input_type": "document",
                                               "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    for d, w in zip(r.json()["data"], want):
        assert d["shape"] == list(w.shape)
        got = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").reshape(d["shape"])
        close(got, w, "base64")
    openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra)")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    out = client.embeddings.create(model="col", input=QUERIES[:2], extra_body={"input_type": "query"})  # base64
    want = enc.encode_query(QUERIES[:2])
    for d, w in zip(out.data, want):  # the client decodes a flat list of floats: rows of `dim`
        close(np.asarray(d.embedding, dtype=np.float32).reshape(-1, enc.get_embedding_dimension()), w, "client")


def test_pylates_shape_is_query(live, cols):
    enc = cols["col"]
    for is_query, want in ((True, enc.encode_query(QUERIES[:3])), (False, enc.encode_document(QUERIES[:3]))):
        r = live.http.post("/v1/embeddings", json={"model": "col", "input": QUERIES[:3], "is_query": is_query})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["object"] for d in body["data"]] == ["embedding"] * 3 and "usage" in body
        for g, w in zip(vectors(body), want):
            close(g, w)
    one = live.http.post("/v1/embeddings", json={"model": "col", "input": QUERY, "is_query": True}).json()
    close(vectors(one)[0], enc.encode_query(QUERY))
    both = live.http.post("/v1/embeddings", json={"model": "col", "input": QUERY, "is_query": True,
                                                  "input_type": "query"})
    assert both.status_code == 200


# ----------------------------------------------------------------------------- MaxSim rerank
@pytest.mark.parametrize("which", ["col", "plain"])
def test_rerank_is_maxsim_as_the_encoder_ranks(live, plain, cols, which):
    s, enc = (live, cols["col"]) if which == "col" else (plain, cols["plain"])
    want = enc.rank(QUERY, DOCUMENTS, return_documents=True)
    r = s.http.post("/rerank", json={"model": which, "query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["index"] for g in got] == [w["corpus_id"] for w in want]
    close([g["score"] for g in got], [w["score"] for w in want])
    assert [g["text"] for g in got] == [w["text"] for w in want]
    q_ids = enc.tokenize([QUERY], is_query=True)[0]
    d_ids = enc.tokenize(DOCUMENTS, is_query=False)[0]
    assert int(r.headers["x-compute-tokens"]) == sum(len(x) for x in q_ids + d_ids)

    docs = [d if i % 2 else {"text": d} for i, d in enumerate(DOCUMENTS)]
    r = s.http.post("/v1/rerank", json={"model": which, "query": QUERY, "documents": docs, "top_n": 2,
                                        "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == which and body["object"] == "rerank" and len(body["results"]) == 2
    assert [x["index"] for x in body["results"]] == [w["corpus_id"] for w in want[:2]]
    close([x["relevance_score"] for x in body["results"]], [w["score"] for w in want[:2]])
    assert [x["document"] for x in body["results"]] == [{"text": w["text"]} for w in want[:2]]
    assert body["usage"]["total_tokens"] == sum(len(x) for x in q_ids + d_ids)


# ----------------------------------------------------------------------------- which model
def test_routing_with_an_embedder_a_reranker_and_a_colbert_model(live, others):
    # /v1/embeddings: the embedder and the ColBERT model can both answer: ask for `model`
    r = live.http.post("/v1/embeddings", json={"input": "x", "input_type": "query"})
    assert r.status_code == 400 and "name one in `model`" in r.json()["error"]["message"]
    assert "'emb'" in r.json()["error"]["message"] and "'col'" in r.json()["error"]["message"]
    # the embedder still takes input_type as its prompt (one pooled vector)
    r = live.http.post("/v1/embeddings", json={"model": "emb", "input": "x", "input_type": "query"})
    assert r.status_code == 200
    close(r.json()["data"][0]["embedding"], others["emb"].encode(["x"], prompt_name="search_query")[0])
    # /embed: only the embedder answers it; the ColBERT model is refused naming its kind
    assert live.http.post("/embed", json={"inputs": "x"}).status_code == 200
    r = live.http.post("/embed", json={"model": "col", "inputs": "x"})
    assert r.status_code == 424 and "multi-vector" in r.json()["error"]
    # /rerank: the reranker and the ColBERT model can both answer: ask for `model`
    for route, docs in (("/rerank", "texts"), ("/v1/rerank", "documents")):
        r = live.http.post(route, json={"query": "q", docs: ["a"]})
        assert r.status_code in (400, 422), r.text
        assert "name one in `model`" in r.text
        assert live.http.post(route, json={"model": "rr", "query": "q", docs: ["a"]}).status_code == 200
        assert live.http.post(route, json={"model": "col", "query": "q", docs: ["a"]}).status_code == 200
    r = live.http.post("/classify", json={"model": "col", "input": "x"})
    assert r.status_code == 400 and "multi-vector" in r.json()["error"]["message"]
    info = live.http.get("/info", params={"model": "col"}).json()
    assert info["model_type"]["multi_vector"]["query_length"] == 32
    assert sorted(info["routes"]) == ["embed_tokens", "rerank", "tokenize"]


def test_one_colbert_model_takes_any_name(plain, cols):
    r = plain.http.post("/v1/embeddings", json={"model": "whatever", "input": "x", "input_type": "document"})
    assert r.status_code == 200
    close(vectors(r.json())[0], cols["plain"].encode_document("x"))
    r = plain.http.post("/embed", json={"inputs": "x"})
    assert r.status_code == 424 and "multi-vector" in r.json()["error"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body, status, words", [
    ({"input": "x"}, 400, "`input_type` is required for the multi-vector model 'col'"),
    ({"input": "x", "input_type": "passage"}, 400, "unknown `input_type` 'passage' for the multi-vector model 'col'"),
    ({"input": "x", "input_type": "search_query"}, 400, "choose one of ['query', 'document']"),
    ({"input": "x", "is_query": "yes"}, 400, "`is_query` must be true or false"),
    ({"input": "x", "input_type": "query", "is_query": False}, 400, "disagree"),
    ({"input": [], "input_type": "query"}, 400, "`input` cannot be empty"),
    ({"input": ["a", ""], "input_type": "query"}, 400, "`input[1]` is an empty string"),
    ({"input": ["a"] * 9, "input_type": "query"}, 400, "batch size 9 > maximum allowed batch size 8"),
    ({"input": [1, 2, 3], "input_type": "query"}, 400, "not a string"),
    ({"input": "x", "input_type": "query", "dimensions": 64}, 400, "`dimensions` does not apply"),
    ({"input": "x", "input_type": "query", "prompt_name": "search_query"}, 400, "`prompt_name` does not apply"),
    ({"input": "x", "input_type": "query", "encoding_format": "int8"}, 400, "unknown `encoding_format`"),
    ({"input": DOCUMENTS, "input_type": "document", "truncate": False}, 400, "`input[2]` has more than 300 tokens"),
])
def test_bad_embedding_input_is_refused_naming_it(live, body, status, words):
    r = live.http.post("/v1/embeddings", json={"model": "col", **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("route, body, words", [
    ("/rerank", {"query": "", "texts": ["a"]}, "`query` is an empty string"),
    ("/rerank", {"query": "q", "texts": []}, "`texts` cannot be empty"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 9}, "9 documents > the maximum of 8"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 3]}, "`documents[1]` is a number"),
    ("/v1/rerank", {"query": "q", "documents": DOCUMENTS, "truncate": False}, "`documents[2]` has more than 300"),
    ("/v1/rerank", {"query": QUERIES[4], "documents": ["a"], "truncate": False}, "`query` has more than 32"),
])
def test_bad_rerank_input_is_refused_naming_it(live, route, body, words):
    r = live.http.post(route, json={"model": "col", **body})
    assert 400 <= r.status_code < 500, r.text
    assert words in r.text


# ----------------------------------------------------------------------------- batching
def test_queries_and_documents_of_many_requests_share_one_forward(live, cols):
    """Expanded queries (their [MASK]s attended by none: key lengths), documents (skiplist) and a
    rerank, from 7 requests, in one `Engine.tokens` call: each answer is its own, as the encoder
    gives it alone."""
    enc = cols["col"]
    requests = []
    for i in range(6):
        texts = [QUERIES[i % len(QUERIES)], DOCUMENTS[i % len(DOCUMENTS)]]
        requests.append(("query" if i % 2 else "document", texts))
    with spied(live, "col") as spy:
        async def main():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
                first = await spy.hold(http)
                rest = [asyncio.ensure_future(_post(http, "/v1/embeddings", {"model": "col", "input": texts,
                                                                             "input_type": kind}))
                        for kind, texts in requests]
                rest.append(asyncio.ensure_future(_post(http, "/v1/rerank", {"model": "col", "query": QUERY,
                                                                             "documents": DOCUMENTS[:3]})))
                await asyncio.to_thread(wait_for, lambda: server_of(live, "col").batcher.queued_requests == 7,
                                        "7 queued")
                spy.gate.set()
                return await first, await asyncio.gather(*rest)

        first, rest = asyncio.run(main())
    assert first[0] == 200
    assert [len(ids) for ids, _ in spy.calls] == [1, 6 * 2 + 1 + 3]  # every request's inputs in one forward
    ids, keys = spy.calls[1]
    q_ids, _, _, q_keys = enc.tokenize([QUERY], is_query=True)
    assert keys is not None and q_ids[0] in ids
    assert keys[ids.index(q_ids[0])] == q_keys[0] < len(q_ids[0])  # the query's expansion kept its key length
    for (kind, texts), (status, body, _) in zip(requests, rest[:-1]):
        assert status == 200, body
        want = enc.encode_query(texts) if kind == "query" else enc.encode_document(texts)
        for g, w in zip(vectors(body), want):
            close(g, w, kind)
    status, body, _ = rest[-1]
    assert status == 200
    want = enc.rank(QUERY, DOCUMENTS[:3])
    close([x["relevance_score"] for x in body["results"]], [w["score"] for w in want])


def test_overload_is_a_429(cols):
    with running(cols["col"], served_model_name="col", max_input_tokens=300, max_queued_tokens=300) as s:
        with spied(s, "col") as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    first = await spy.hold(http)
                    admitted, refused = [], []
                    batcher = server_of(s, "col").batcher
                    for i in range(10):  # 64 or 37 tokens each: the 300-token queue holds 5 or 6
                        body = ({"input": ["q one", "q two"], "input_type": "query"} if i % 2 else
                                {"query": "q", "texts": ["a b"]})
                        task = asyncio.ensure_future(_post(http, "/v1/embeddings" if i % 2 else "/rerank", body))
                        while not task.done() and batcher.queued_requests == len(admitted):
                            await asyncio.sleep(0.005)
                        (refused if task.done() else admitted).append(task)
                    spy.gate.set()
                    return await first, await asyncio.gather(*admitted), [t.result() for t in refused]

            first, admitted, refused = asyncio.run(main())
        assert first[0] == 200 and admitted and refused and len(admitted) + len(refused) == 10
        assert all(status == 200 for status, _, _ in admitted)
        for status, body, headers in refused:
            assert status == 429 and int(headers["retry-after"]) >= 1, body
            assert "overloaded" in str(body)
        assert server_of(s, "col").batcher.tokens_in_flight == 0


def test_a_disconnected_request_is_dropped(live, cols):
    gone = "this client will hang up"
    with spied(live, "col") as spy:
        hang_up_while_held(live, spy, server_of(live, "col").batcher, "col", "/v1/embeddings",
                           {"model": "col", "input": gone, "input_type": "document"})
    mine = cols["col"].tokenize([gone], is_query=False)[0][0]
    assert all(mine not in ids for ids, _ in spy.calls)  # it never reached the engine
    r = live.http.post("/v1/embeddings", json={"model": "col", "input": "after", "input_type": "query"})
    assert r.status_code == 200
