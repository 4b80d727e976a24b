"""The server with several models at once: an embedder, a reranker (a one-label cross-encoder) and
a three-label classifier, on loopback. TEI's `/rerank` and `/predict`, the Cohere/Jina
`/v1/rerank`, vLLM's `/classify`, each equal to `CrossEncoder` on the same inputs; which model a
request reaches (its `model` field, or the route's only model of the right kind); bad input in
each route's shape; many clients, pairs of several requests in one forward, overload, a client
that leaves, each model's own queue and metrics.

Small random checkpoints with the real tokenizer and max_seq_length 64 (truncation shows on
short texts)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the test extra)")

from conftest import fixture_file  # noqa: E402
from helpers import REAL_VOCAB  # noqa: E402
from modernbert_embed import CrossEncoder, Embedder  # noqa: E402
from modernbert_embed.weights import classifier_config, write_random_checkpoint  # noqa: E402
from test_server import _post, hang_up_while_held, make_texts, running, spy_on, wait_for  # noqa: E402

MSL = 64
LABELS = {"0": "negative", "1": "neutral", "2": "positive"}
SHARED = dict(served_model_name=("emb", "rr", "cls"), max_client_batch_size=16, payload_limit=256 * 1024)
QUERY = "how to implement quick sort in python?"
DOCS = ["Introduction of quick sort", "The weather is nice today", "quick sort picks a pivot and partitions",
        "naïve café 東京", "a python list can be sorted with sorted()"]


def _write(tmp_path_factory, name, cfg, seed):
    return write_random_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=seed,
                                   tokenizer_json=fixture_file("tokenizer.json"), max_seq_length=MSL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"emb": _write(tmp_path_factory, "emb", REAL_VOCAB, 11),
            "rr": _write(tmp_path_factory, "rr", classifier_config(REAL_VOCAB, num_labels=1), 3),
            "cls": _write(tmp_path_factory, "cls", classifier_config(REAL_VOCAB, num_labels=3, id2label=LABELS,
                                                                     label2id={v: int(k) for k, v in LABELS.items()}),
                          5)}


@pytest.fixture(scope="module")
def models(folders):
    return {"emb": Embedder.from_pretrained(folders["emb"], device="cpu"),
            "rr": CrossEncoder.from_pretrained(folders["rr"], device="cpu"),
            "cls": CrossEncoder.from_pretrained(folders["cls"], device="cpu")}


@pytest.fixture(scope="module")
def live(models):
    with running([models["emb"], models["rr"], models["cls"]], **SHARED) as s:
        yield s


def served(live, name):
    return live.state.by_name[name]


def close(got, want, what=""):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=1e-4, atol=1e-5, err_msg=what)


def spied(live, name):
    """A gate in front of the model `name`'s `score` (`test_server.Spy`); `hold` sends a rerank."""
    return spy_on(served(live, name).batcher, method="score",
                  hold_request=("/rerank", {"model": name, "query": "hold", "texts": ["it"]}))


# ----------------------------------------------------------------------------- results
def test_tei_rerank_equals_crossencoder_rank(live, models):
    rr = models["rr"]
    want = rr.rank(QUERY, DOCS, return_documents=True)
    r = live.http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})  # model: the reranker
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["index"] for g in got] == [w["corpus_id"] for w in want]  # best first
    close([g["score"] for g in got], [w["score"] for w in want])
    assert [g["text"] for g in got] == [w["text"] for w in want]
    raw = live.http.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    logits = rr.logits([(QUERY, d) for d in DOCS])[:, 0].numpy()
    close([g["score"] for g in sorted(raw, key=lambda g: g["index"])], logits)
    assert "text" not in raw[0]
    assert int(r.headers["x-compute-tokens"]) == sum(len(s) for s in rr.tokenize([(QUERY, d) for d in DOCS])[0])


def test_v1_rerank_equals_crossencoder_rank(live, models):
    rr = models["rr"]
    want = rr.rank(QUERY, DOCS, top_k=3)
    docs = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]  # strings or {text}
    r = live.http.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": docs, "top_n": 3,
                                           "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "rr" and len(body["results"]) == 3
    assert [x["index"] for x in body["results"]] == [w["corpus_id"] for w in want]
    close([x["relevance_score"] for x in body["results"]], [w["score"] for w in want])
    assert [x["document"] for x in body["results"]] == [{"text": DOCS[w["corpus_id"]]} for w in want]
    tokens = sum(len(s) for s in rr.tokenize([(QUERY, d) for d in DOCS])[0])
    assert body["usage"]["total_tokens"] == tokens
    everything = live.http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()["results"]
    assert len(everything) == len(DOCS) and "document" not in everything[0]


def test_predict_equals_crossencoder_predict(live, models):
    cls, rr = models["cls"], models["rr"]
    inputs = ["a single text to classify", ["first of a pair", "second of a pair"], ["one text in a list"]]
    want = cls.predict([[inputs[0]], tuple(inputs[1]), inputs[2]], apply_softmax=True)  # a list: many inputs
    r = live.http.post("/predict", json={"model": "cls", "inputs": inputs})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == 3
    names = list(LABELS.values())
    for row, w in zip(got, want):
        assert [x["label"] for x in row] == [names[j] for j in np.argsort(-w, kind="stable")]  # best first
        close([x["score"] for x in sorted(row, key=lambda x: names.index(x["label"]))], w)
    one = live.http.post("/predict", json={"model": "cls", "inputs": ["first of a pair", "second of a pair"]}).json()
    assert isinstance(one[0], dict)  # one input (a pair): its list alone
    close(sorted(x["score"] for x in one), sorted(want[1]))
    raw = live.http.post("/predict", json={"model": "cls", "inputs": "a single text to classify",
                                           "raw_scores": True}).json()
    close([x["score"] for x in sorted(raw, key=lambda x: names.index(x["label"]))],
          cls.logits(["a single text to classify"])[0].numpy())
    pair = live.http.post("/predict", json={"model": "rr", "inputs": [QUERY, DOCS[0]]}).json()
    assert pair[0]["label"] == "LABEL_0"
    close(pair[0]["score"], rr.predict((QUERY, DOCS[0])))  # sigmoid for one label


@pytest.mark.parametrize("route", ["/classify", "/v1/classify"])
def test_classify_in_vllms_shape(live, models, route):
    cls = models["cls"]
    texts = ["a single text to classify", "another one, a little longer than the first"]
    want = cls.predict([[t] for t in texts], apply_softmax=True)  # (two strings alone would be one pair)
    r = live.http.post(route, json={"model": "cls", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "cls" and body["id"].startswith("classify-")
    assert body["usage"]["total_tokens"] == sum(len(s) for s in cls.tokenize(texts)[0])
    for i, (d, w) in enumerate(zip(body["data"], want)):
        assert d["index"] == i and d["num_classes"] == 3
        close(d["probs"], w)
        assert d["label"] == list(LABELS.values())[int(np.argmax(w))]


def test_embeddings_beside_the_classifiers(live, models):
    texts = make_texts(3, seed=1)
    want = models["emb"].encode(texts)
    got = live.http.post("/embed", json={"inputs": texts}).json()  # no model: the only embedder
    close(got, want)
    got = live.http.post("/v1/embeddings", json={"model": "emb", "input": texts}).json()
    assert got["model"] == "emb"
    close([d["embedding"] for d in got["data"]], want)


# ----------------------------------------------------------------------------- which model
def test_the_model_field_picks_and_wrong_kinds_are_refused(live):
    h = live.http
    assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["emb", "rr", "cls"]
    info = h.get("/info").json()
    assert [m["served_model_name"] for m in info["models"]] == ["emb", "rr", "cls"]
    assert h.get("/info", params={"model": "rr"}).json()["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    assert h.get("/info", params={"model": "cls"}).json()["labels"] == list(LABELS.values())
    assert h.get("/info", params={"model": "nope"}).status_code == 404
    # an unknown name, with several models: 404 model_not_found in the route's shape
    r = h.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert "'nope'" in r.json()["error"]["message"] and "'rr'" in r.json()["error"]["message"]
    r = h.post("/rerank", json={"model": "nope", "query": "q", "texts": ["d"]})
    assert r.status_code == 404 and r.json()["error_type"] == "model_not_found", r.text
    r = h.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # a route asked of a model that cannot do it: a 4xx naming the model's kind
    r = h.post("/rerank", json={"model": "emb", "query": "q", "texts": ["d"]})
    assert r.status_code == 424 and r.json()["error_type"] == "backend" and "embedder" in r.json()["error"], r.text
    r = h.post("/v1/embeddings", json={"model": "rr", "input": "x"})
    assert r.status_code == 400 and "reranker" in r.json()["error"]["message"], r.text
    r = h.post("/v1/rerank", json={"model": "cls", "query": "q", "documents": ["d"]})
    assert r.status_code == 400 and "classifier with 3 labels" in r.json()["error"]["message"], r.text
    r = h.post("/classify", json={"model": "emb", "input": "x"})
    assert r.status_code == 400 and "embedder" in r.json()["error"]["message"], r.text
    # no model field: the route's only model of its kind, or a 400 when there are several
    r = h.post("/predict", json={"inputs": "x"})
    assert r.status_code == 422 and "'rr'" in r.json()["error"] and "'cls'" in r.json()["error"], r.text
    r = h.post("/v1/rerank", json={"model": 7, "query": "q", "documents": ["d"]})
    assert r.status_code == 400 and "`model` must be a string" in r.json()["error"]["message"]
    assert h.post("/tokenize", json={"model": "rr", "inputs": "x"}).status_code == 200


def test_one_model_takes_any_name_and_refuses_other_routes(models, folders):
    with running(models["rr"], max_client_batch_size=16) as s:
        r = s.http.post("/v1/rerank", json={"model": "whatever-the-client-says", "query": QUERY, "documents": DOCS})
        assert r.status_code == 200 and len(r.json()["results"]) == len(DOCS)
        r = s.http.post("/embed", json={"inputs": "x"})
        assert r.status_code == 424 and "reranker" in r.json()["error"], r.text
        r = s.http.post("/v1/embeddings", json={"model": "anything", "input": "x"})
        assert r.status_code == 400 and "reranker" in r.json()["error"]["message"], r.text
        assert [m["id"] for m in s.http.get("/v1/models").json()["data"]] == [str(folders["rr"])]
    # without --served-model-name, a folder answers to its path and to its last component
    with running([models["emb"], models["rr"]]) as s:
        for name in (str(folders["rr"]), folders["rr"].name):
            r = s.http.post("/v1/rerank", json={"model": name, "query": QUERY, "documents": DOCS[:2]})
            assert r.status_code == 200, (name, r.text)
        # two models: /predict without a name takes the only classifier
        assert s.http.post("/predict", json={"inputs": [QUERY, DOCS[0]]}).status_code == 200


def test_names_must_match_the_models():
    from modernbert_embed.server import ServerSettings
    from modernbert_embed.server.state import ServerState

    class Fake:  # never reached: the names are checked first
        pass

    with pytest.raises(ValueError, match="given 1 time.*for 2 model"):
        ServerState([Fake(), Fake()], ServerSettings(served_model_name=("a",)))
    with pytest.raises(ValueError, match="one --served-model-name for 2 models"):
        ServerState([Fake(), Fake()], ServerSettings(served_model_name="a"))


def test_two_models_of_one_name_are_refused(models):
    from modernbert_embed.server import ServerSettings, create_app

    with pytest.raises(ValueError, match="two models are served as 'x'"):
        create_app([models["emb"], models["rr"]], ServerSettings(served_model_name=("x", "x")))


# ----------------------------------------------------------------------------- bad input
LONG = " ".join(["sorting"] * 200)
BAD = [  # (route, body, status, words)
    ("/rerank", {"texts": ["d"]}, 422, "`query` is required"),
    ("/rerank", {"query": "", "texts": ["d"]}, 400, "`query` is an empty string"),
    ("/rerank", {"query": 5, "texts": ["d"]}, 422, "`query` must be a string"),
    ("/rerank", {"query": "q", "texts": []}, 400, "`texts` cannot be empty"),
    ("/rerank", {"query": "q"}, 422, "`texts` is required"),
    ("/rerank", {"query": "q", "texts": ["d"] * 17}, 422, "17 texts > the maximum of 16"),
    ("/rerank", {"query": "q", "texts": ["d", 3]}, 422, "`texts[1]` is a number, not a string"),
    ("/rerank", {"query": "q", "texts": ["d", ""]}, 400, "`texts[1]` is an empty string"),
    ("/rerank", {"query": "q", "texts": ["d"], "truncation_direction": "left"}, 422, "not supported"),
    ("/rerank", {"query": "q", "texts": ["d"], "raw_scores": "yes"}, 422, "`raw_scores` must be true or false"),
    ("/rerank", {"query": LONG, "texts": ["d"], "truncate": False}, 422, "`query` has 203 tokens"),
    ("/rerank", {"query": "q", "texts": ["d", LONG], "truncate": False}, 422, "`texts[1]` with the query has more"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, 400, "`top_n` must be at least 1, got 0"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 1.5}, 400, "`top_n` must be a whole number"),
    ("/v1/rerank", {"query": "q", "documents": [{"txt": "d"}]}, 400, "`documents[0]` is an object without"),
    ("/v1/rerank", {"query": "q", "documents": [None]}, 400, "`documents[0]` is null"),
    ("/v1/rerank", {"query": "q", "documents": "d"}, 400, "`documents` must be a list of strings"),
    ("/v1/rerank", {"query": "", "documents": ["d"]}, 400, "`query` is an empty string"),
    ("/v1/rerank", {"documents": ["d"]}, 400, "`query` is required"),
    ("/v1/rerank", {"query": "q", "documents": ["d"] * 17}, 400, "17 documents > the maximum of 16"),
    ("/predict", {"model": "cls", "inputs": []}, 400, "`inputs` cannot be empty"),
    ("/predict", {"model": "cls", "inputs": [["a", "b", "c"]]}, 422, "`inputs[0]` is a list of 3 items"),
    ("/predict", {"model": "cls", "inputs": [1, 2]}, 422, "`inputs[0]` is a number"),
    ("/predict", {"model": "cls", "inputs": {"a": 1}}, 422, "`inputs` must be a text, a pair"),
    ("/predict", {"model": "cls"}, 422, "`inputs` is required"),
    ("/predict", {"model": "cls", "inputs": ["x"] * 17}, 422, "batch size 17 > maximum allowed batch size 16"),
    ("/predict", {"model": "cls", "inputs": LONG, "truncate": False}, 422, "`inputs` has more than 64 tokens"),
    ("/classify", {"model": "cls", "input": 3}, 400, "`input` must be a string or a list of strings"),
    ("/classify", {"model": "cls", "input": [[1, 2]]}, 400, "`input[0]` is a list, not a string"),
    ("/classify", {"model": "cls", "input": ""}, 400, "`input` is an empty string"),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_in_the_route_shape(live, route, body, status, words):
    r = live.http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    message = err["message"] if route.startswith("/v1/") or route == "/classify" else err
    assert words in message, message
    if route.startswith("/v1/") or route == "/classify":
        assert set(err) == {"message", "type", "param", "code"}
    else:
        assert set(r.json()) == {"error", "error_type"}
    assert live.http.post("/rerank", json={"query": "q", "texts": ["still serving"]}).status_code == 200


def test_a_long_query_is_truncated_and_reported(live, models):
    r = live.http.post("/rerank", json={"query": LONG, "texts": ["d", "e"]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "2"
    want = models["rr"].predict([(LONG, "d"), (LONG, "e")])
    close([g["score"] for g in sorted(r.json(), key=lambda g: g["index"])], want)
    assert live.metric("modernbert_embed_truncated_inputs_total", route="/rerank", model="rr") >= 2


# ----------------------------------------------------------------------------- load
def test_many_clients_on_every_route_get_their_own_answers(live, models):
    rr, cls, emb = models["rr"], models["cls"], models["emb"]
    clients, rounds = 16, 3
    docs = {c: make_texts(2 + c % 3, seed=200 + c) for c in range(clients)}
    queries = {c: make_texts(1, seed=300 + c)[0] for c in range(clients)}
    forwards = served(live, "rr").batcher.forwards

    def want(c):
        k = c % 4
        if k in (0, 1):
            return rr.predict([(queries[c], d) for d in docs[c]])
        if k == 2:
            return cls.predict([[d] for d in docs[c]], apply_softmax=True)
        return emb.encode(docs[c])

    wants = {c: want(c) for c in range(clients)}

    async def client(c, http):
        out = []
        for _ in range(rounds):
            k = c % 4
            if k == 0:
                status, body, _ = await _post(http, "/rerank", {"query": queries[c], "texts": docs[c]})
                got = [g["score"] for g in sorted(body, key=lambda g: g["index"])]
            elif k == 1:
                status, body, _ = await _post(http, "/v1/rerank", {"query": queries[c], "documents": docs[c]})
                got = [g["relevance_score"] for g in sorted(body["results"], key=lambda g: g["index"])]
            elif k == 2:
                status, body, _ = await _post(http, "/classify", {"model": "cls", "input": docs[c]})
                got = [d["probs"] for d in body["data"]]
            else:
                status, body, _ = await _post(http, "/embed", {"inputs": docs[c]})
                got = body
            assert status == 200, body
            out.append(got)
        return out

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            return await asyncio.gather(*(client(c, http) for c in range(clients)))

    for c, answers in enumerate(asyncio.run(main())):
        assert len(answers) == rounds
        for got in answers:
            close(got, wants[c], f"client {c}")
    assert served(live, "rr").batcher.forwards - forwards < clients // 2 * rounds  # requests shared forwards


def test_pairs_of_many_requests_share_one_forward(live, models):
    rr = models["rr"]
    queries = make_texts(8, seed=9)
    with spied(live, "rr") as spy:
        async def main():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
                first = await spy.hold(http)
                rest = [asyncio.ensure_future(_post(http, "/rerank" if i % 2 else "/v1/rerank",
                                                    {"query": q, "texts" if i % 2 else "documents": DOCS[:3]}))
                        for i, q in enumerate(queries)]
                await asyncio.to_thread(wait_for, lambda: served(live, "rr").batcher.queued_requests == 8, "8 queued")
                spy.gate.set()
                return await first, await asyncio.gather(*rest)

        first, rest = asyncio.run(main())
    assert first[0] == 200
    assert [len(call) for call in spy.calls] == [1, 24]  # the 8 requests' 24 pairs in one forward
    for i, (q, (status, body, _)) in enumerate(zip(queries, rest)):
        assert status == 200
        results = body if i % 2 else body["results"]
        key = "score" if i % 2 else "relevance_score"
        close([g[key] for g in sorted(results, key=lambda g: g["index"])], rr.predict([(q, d) for d in DOCS[:3]]))


def test_overload_is_a_429_per_model_and_the_other_model_still_serves(models):
    with running([models["emb"], models["rr"]], served_model_name=("emb", "rr"), max_queued_tokens=200) as s:
        with spied(s, "rr") as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    first = await spy.hold(http)
                    admitted, refused = [], []
                    batcher = served(s, "rr").batcher
                    for i in range(12):  # 3 pairs of ~15 tokens: the 200-token queue is full after 4
                        route = "/v1/rerank" if i % 2 else "/rerank"
                        body = {"query": " ".join(["vector"] * 10), "texts" if route == "/rerank" else "documents":
                                ["token token token"] * 3}
                        task = asyncio.ensure_future(_post(http, route, body))
                        while not task.done() and batcher.queued_requests == len(admitted):
                            await asyncio.sleep(0.005)
                        if task.done():
                            refused.append((route, task.result()))
                        else:
                            admitted.append(task)
                    # the embedder has its own queue: it answers while the reranker's is full
                    embedded = await _post(http, "/embed", {"inputs": "beside a full reranker"})
                    spy.gate.set()
                    return await first, await asyncio.gather(*admitted), refused, embedded

            first, admitted, refused, embedded = asyncio.run(main())
        assert embedded[0] == 200
        assert first[0] == 200 and admitted and refused and len(admitted) + len(refused) == 12
        assert all(status == 200 for status, _, _ in admitted)
        for route, (status, body, headers) in refused:
            assert status == 429 and int(headers["retry-after"]) >= 1
            message = body["error"]["message"] if route.startswith("/v1/") else body["error"]
            assert "overloaded" in message
        assert s.metric("modernbert_embed_rejections_total", reason="overloaded") == len(refused)
        r = s.http.post("/rerank", json={"query": "after", "texts": ["the load"]})
        assert r.status_code == 200
        assert served(s, "rr").batcher.tokens_in_flight == 0


def test_a_disconnected_rerank_is_dropped(live, models):
    gone = "this client will hang up"
    with spied(live, "rr") as spy:
        hang_up_while_held(live, spy, served(live, "rr").batcher, "rr", "/v1/rerank",
                           {"query": gone, "documents": DOCS})
        r = live.http.post("/v1/rerank", json={"query": "after the hang-up", "documents": DOCS[:2]})
    assert r.status_code == 200
    pairs = models["rr"].tokenize([(gone, d) for d in DOCS])[0]
    assert all(p not in call for call in spy.calls for p in pairs)  # its pairs never reached the engine


def test_each_model_has_its_own_metrics(live):
    live.http.post("/rerank", json={"query": "q", "texts": ["a", "b"]})
    live.http.post("/classify", json={"model": "cls", "input": "c"})
    assert live.metric("modernbert_embed_inputs_total", route="/rerank", model="rr") >= 2
    assert live.metric("modernbert_embed_inputs_total", route="/classify", model="cls") >= 1
    text = live.http.get("/metrics").text
    for name in ("emb", "rr", "cls"):
        assert f'modernbert_embed_model_tokens_in_flight{{model="{name}"}}' in text
        assert f'modernbert_embed_batch_tokens_count{{model="{name}"}}' in text  # its warm-up forward at least


def test_the_command_line_refuses_a_name_count_that_does_not_match(folders, capsys):
    from modernbert_embed.cli import main

    rc = main(["serve", "--model", str(folders["emb"]), "--model", str(folders["rr"]), "--served-model-name", "x",
               "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--served-model-name was given 1 time(s) for 2 --model(s)" in err, err


def test_the_server_wide_limits_cover_the_new_routes(models):
    with running([models["emb"], models["rr"], models["cls"]], **SHARED, max_concurrent_requests=2) as s:
        with spied(s, "rr") as spy:
            async def main():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    first = await spy.hold(http)
                    second = asyncio.ensure_future(_post(http, "/v1/rerank", {"query": "q", "documents": ["d"]}))
                    while served(s, "rr").batcher.queued_requests < 1:
                        await asyncio.sleep(0.005)
                    refused = [await http.post("/rerank", json={"query": "q", "texts": ["d"]}),
                               await http.post("/v1/rerank", json={"query": "q", "documents": ["d"]}),
                               await http.post("/predict", json={"model": "cls", "inputs": "x"}),
                               await http.post("/classify", json={"model": "cls", "input": "x"})]
                    spy.gate.set()
                    return await first, await second, refused

            first, second, refused = asyncio.run(main())
        assert first[0] == 200 and second[0] == 200
        for r in refused:
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
            assert "2 requests in flight, limit 2" in r.text
        # the payload limit, in the route's shape
        r = s.http.post("/v1/rerank", json={"query": "q", "documents": ["d" * 300_000]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
        r = s.http.post("/predict", json={"model": "cls", "inputs": "x" * 300_000})
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large", r.text


def test_a_long_document_is_cut_and_scored_as_the_cross_encoder_does(live, models):
    doc = "the quick brown fox jumps over the lazy dog " * 5000  # 220 kB: 50,000 tokens whole
    r = live.http.post("/rerank", json={"query": QUERY, "texts": [doc, "short"]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1", r.text
    got = [g["score"] for g in sorted(r.json(), key=lambda g: g["index"])]
    close(got, models["rr"].predict([(QUERY, doc), (QUERY, "short")]))


def test_a_folder_name_two_models_share_picks_neither(models, tmp_path):
    """Two folders of the same last component: each answers to its path, neither to the shared name."""
    from modernbert_embed.server.state import ServerState
    from modernbert_embed.server import ServerSettings
    from modernbert_embed.loaded import LoadedModel

    a, b = models["emb"].loaded, models["rr"].loaded
    a2 = LoadedModel(a.engine, a.tokenizer, a.max_seq_length, name=str(tmp_path / "x" / "model"))
    b2 = LoadedModel(b.engine, b.tokenizer, b.max_seq_length, name=str(tmp_path / "y" / "model"))
    state = ServerState([a2, b2], ServerSettings())
    try:
        assert state.pick(str(tmp_path / "y" / "model"), "rerank", "/rerank").loaded is b2
        from modernbert_embed.server.errors import ApiError

        with pytest.raises(ApiError, match="not served here"):
            state.pick("model", "rerank", "/rerank")
    finally:
        state.pool.shutdown()
        state.large_pool.shutdown()
