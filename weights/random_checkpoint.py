"""Write a random-weight checkpoint in the real layouts of the family: same file names, tensor names,
shapes and sentence-transformers files. For tests and benchmarks on machines without the real weights.

The layout follows `config.architectures`:
  - `ModernBertModel` (nomic, gte-modernbert, the large shape, Ettin): the backbone's own names
    and the sentence-transformers files (modules.json: Transformer -> Pooling, -> Normalize when
    `normalize`);
  - `ModernBertForMaskedLM`: the backbone under `model.`, the prediction head (`head.*`,
    `decoder.bias`), no sentence-transformers files;
  - `ModernBertForSequenceClassification` (`classifier_config`): the backbone under `model.`,
    `head.dense.weight` (+`.bias` iff classifier_bias), `head.norm.weight`, `classifier.weight`
    and `.bias`, no sentence-transformers files (as gte-reranker-modernbert-base).
  - a PyLate ColBERT folder (`colbert=colbert_st_config(...)`, as lightonai/GTE-ModernColBERT-v1):
    the backbone's own names, modules.json Transformer -> `pylate.models.Dense.Dense` in `1_Dense`
    (config.json, model.safetensors with `linear.weight` [out, hidden], `linear.bias` iff bias),
    config_sentence_transformers.json with the ColBERT fields, and the tokenizer with `[Q] ` and
    `[D] ` added after its vocabulary (`write_colbert_tokenizer`), so vocab_size is the
    tokenizer's + 2 (50370 on ModernBERT's).

The weights are perturbed so that mistakes show: norm weights are 1 +- 0.1 rather than exactly 1,
and the attention projections are scaled up so attention is far from uniform (a wrong window or
wrong rotary then moves the output a lot).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import ModernBertConfig
from .folder import COLBERT_DEFAULTS, read_classifier

CLASSIFIER_ARCH = "ModernBertForSequenceClassification"
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
                    "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                    "mask_token": "[MASK]", "model_input_names": ["input_ids", "attention_mask"]}
MASKED_LM_ARCH = "ModernBertForMaskedLM"


def small_config(**overrides) -> dict[str, Any]:
    """A small ModernBERT config.json (4.48 schema) for tests and smoke runs: 2 heads of 64 (the
    real head_dim), the real window of +-64, 4 layers (global, local, local, global), a 1024-token
    vocabulary with [CLS]=1, [SEP]=2, [PAD]=3. `overrides` replace or add keys."""
    cfg = {
        "model_type": "modernbert",
        "architectures": ["ModernBertModel"],
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "global_attn_every_n_layers": 3,
        "local_attention": 128,
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "hidden_activation": "gelu",
        "attention_bias": False,
        "mlp_bias": False,
        "norm_bias": False,
        "pad_token_id": 3,
        "cls_token_id": 1,
        "sep_token_id": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def classifier_config(base: Mapping[str, Any], num_labels: int = 1, pooling: str = "mean",
                      activation_fn: str | None = None, **overrides) -> dict[str, Any]:
    """`base` (a config.json dict) as a `ModernBertForSequenceClassification`: `num_labels`
    labels (id2label LABEL_i), `classifier_pooling`, sentence-transformers' `activation_fn` when
    given (a torch.nn path); `overrides` add or replace keys (classifier_bias, ...)."""
    cfg = {**base, "architectures": [CLASSIFIER_ARCH], "classifier_pooling": pooling,
           "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
           "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
    if activation_fn is not None:
        cfg["sentence_transformers"] = {"activation_fn": activation_fn}
    cfg.update(overrides)
    return cfg


def ettin_config(**overrides) -> dict[str, Any]:
    """An Ettin-encoder-shaped config (jhu-clsp/ettin-encoder-17m's width): vocab 50370 (the
    tokenizer's 50368 ids and two more rows), both rope thetas 160000, 7999 positions; `overrides`
    replace or add keys."""
    cfg = small_config(vocab_size=50370, hidden_size=256, intermediate_size=384, num_hidden_layers=7,
                       num_attention_heads=4, global_rope_theta=160000.0, local_rope_theta=160000.0,
                       max_position_embeddings=7999, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282,
                       bos_token_id=50281, eos_token_id=50282)
    cfg.update(overrides)
    return cfg


def colbert_st_config(**overrides) -> dict[str, Any]:
    """config_sentence_transformers.json of a PyLate ColBERT folder as PyLate 1.6 saves it, with
    GTE-ModernColBERT-v1's lengths (query 32, document 300); `overrides` replace or add fields
    (do_query_expansion, attend_to_expansion_tokens, skiplist_words, ...)."""
    cfg = {"model_type": "ColBERT", "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
           "similarity_fn_name": "MaxSim", **COLBERT_DEFAULTS, "document_length": 300}
    cfg.update(overrides)
    return cfg


def write_colbert_tokenizer(tokenizer_json: str | Path, out: str | Path, prefixes: tuple[str, ...] = ("[Q] ", "[D] ")
                            ) -> list[int]:
    """Copy `tokenizer_json` to `out` with `prefixes` added as PyLate adds them
    (`tokenizer.add_tokens`: plain added tokens, normalized, not special), after the vocabulary;
    returns their ids (50368, 50369 on ModernBERT's tokenizer)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.add_tokens([AddedToken(p, single_word=False, lstrip=False, rstrip=False, normalized=True, special=False)
                    for p in prefixes])
    Path(out).write_text(tok.to_str(pretty=True), encoding="utf-8")
    return [tok.token_to_id(p) for p in prefixes]


def random_state_dict(cfg: ModernBertConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, I = cfg.hidden_size, cfg.intermediate_size

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_weight():
        return (1.0 + (torch.rand(H, generator=g) - 0.5) * 0.2).to(dtype)

    sd = {
        "embeddings.tok_embeddings.weight": normal(cfg.vocab_size, H, std=0.5),
        "embeddings.norm.weight": norm_weight(),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        if i > 0:
            sd[p + "attn_norm.weight"] = norm_weight()
        sd[p + "attn.Wqkv.weight"] = normal(3 * H, H, std=1.5 / H**0.5)
        sd[p + "attn.Wo.weight"] = normal(H, H, std=0.5 / H**0.5)
        sd[p + "mlp_norm.weight"] = norm_weight()
        sd[p + "mlp.Wi.weight"] = normal(2 * I, H, std=1.0 / H**0.5)
        sd[p + "mlp.Wo.weight"] = normal(H, I, std=0.5 / I**0.5)
    sd["final_norm.weight"] = norm_weight()
    return sd


def write_random_checkpoint(
    folder: str | Path,
    config: Mapping[str, Any] | ModernBertConfig | None = None,
    seed: int = 0,
    *,
    prefix: str = "",
    with_head: bool = False,
    shards: int = 1,
    tokenizer_json: str | Path | None = None,
    max_seq_length: int | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    st_files: bool | None = None,
    colbert: Mapping[str, Any] | None = None,
    dense_dim: int = 128,
    dense_bias: bool = False,
) -> Path:
    """Write `config.json`, `model.safetensors` (or `shards` files and an index) and, for an
    embedder, the sentence-transformers files into `folder` (see the module docstring).

    config: a config.json dict (written as given, so either schema can be tested), a
    `ModernBertConfig`, or None for the base model's shape. prefix="model." and with_head=True
    give the masked-LM tensors (a `ModernBertForMaskedLM` config gives them by itself). pooling
    and normalize: the Pooling module's mode and whether a Normalize module is listed. st_files:
    write the sentence-transformers files (default: for a `ModernBertModel` only).
    tokenizer_json is copied in when given. colbert: a PyLate ColBERT folder with these
    config_sentence_transformers.json fields (`colbert_st_config`), a `dense_dim`-wide projection
    (biased iff `dense_bias`); config's vocab_size must then leave room for the two prefix tokens
    (the tokenizer's size + 2).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = ModernBertConfig()
    if isinstance(config, ModernBertConfig):
        cfg, raw = config, config.to_dict()
    else:
        cfg, raw = ModernBertConfig.from_dict(config), dict(config)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    arch = (raw.get("architectures") or ["ModernBertModel"])[0]
    if arch in (CLASSIFIER_ARCH, MASKED_LM_ARCH):
        prefix, with_head = "model.", arch == MASKED_LM_ARCH or with_head
    if st_files is None:
        st_files = arch == "ModernBertModel"
    if colbert is not None and arch != "ModernBertModel":
        raise ValueError(f"a ColBERT folder has a ModernBertModel backbone, not {arch}")

    sd = {prefix + k: v for k, v in random_state_dict(cfg, seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    H = cfg.hidden_size
    if arch == CLASSIFIER_ARCH:
        # O(1) logits that differ between inputs: the head must be computed exactly to match
        spec = read_classifier(raw, cfg, folder / "config.json")
        sd["head.dense.weight"] = torch.randn(H, H, generator=g) / H**0.5
        if spec.bias:
            sd["head.dense.bias"] = torch.randn(H, generator=g) * 0.5
        sd["head.norm.weight"] = 1.0 + (torch.rand(H, generator=g) - 0.5) * 0.2
        if spec.norm_bias:
            sd["head.norm.bias"] = torch.randn(H, generator=g) * 0.1
        sd["classifier.weight"] = torch.randn(spec.num_labels, H, generator=g) / H**0.5
        sd["classifier.bias"] = torch.randn(spec.num_labels, generator=g) * 0.5
    elif with_head:
        sd["head.dense.weight"] = torch.randn(H, H, generator=g) * 0.02
        sd["head.norm.weight"] = torch.ones(H)
        sd["decoder.bias"] = torch.zeros(cfg.vocab_size)

    names = list(sd)
    if shards <= 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    if colbert is not None:
        return _write_colbert(folder, cfg, dict(colbert), seed, tokenizer_json, dense_dim, dense_bias)
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
        # as the Hub's ModernBERT folders: transformers' loader needs the special tokens named, and
        # without sentence_bert_config.json `model_max_length` is the length sentence-transformers
        # (and this engine) truncate to
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {**TOKENIZER_CONFIG, "model_max_length": max_seq_length or cfg.max_position_embeddings}, indent=2))
    if not st_files:
        return folder
    # The sentence-transformers pipeline: Transformer -> Pooling (-> Normalize).
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    msl = max_seq_length or cfg.max_position_embeddings
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": msl, "do_lower_case": False}, indent=2)
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": cfg.hidden_size,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
            indent=2,
        )
    )
    return folder


def _write_colbert(folder: Path, cfg: ModernBertConfig, st: dict, seed: int, tokenizer_json, dim: int, bias: bool
                   ) -> Path:
    """The sentence-transformers files of a PyLate ColBERT folder (see the module docstring)."""
    from safetensors.torch import save_file

    if tokenizer_json is not None:
        prefixes = tuple(st[k] for k in ("query_prefix", "document_prefix") if st.get(k))
        ids = write_colbert_tokenizer(tokenizer_json, folder / "tokenizer.json", prefixes)
        if max(ids, default=0) >= cfg.vocab_size:
            raise ValueError(f"the prefix tokens get ids {ids}, outside vocab_size {cfg.vocab_size}: make it "
                             f"{max(ids) + 1}")
        # PyLate's tokenizer pads (query expansion) with [MASK]
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {**TOKENIZER_CONFIG, "pad_token": "[MASK]", "model_max_length": cfg.max_position_embeddings}, indent=2))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": cfg.max_position_embeddings, "do_lower_case": False}, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2))
    dense = folder / "1_Dense"
    dense.mkdir(exist_ok=True)
    (dense / "config.json").write_text(json.dumps(
        {"in_features": cfg.hidden_size, "out_features": dim, "bias": bias,
         "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False}, indent=4))
    g = torch.Generator().manual_seed(seed + 2)
    tensors = {"linear.weight": torch.randn(dim, cfg.hidden_size, generator=g) / cfg.hidden_size**0.5}
    if bias:
        tensors["linear.bias"] = torch.randn(dim, generator=g) * 0.1
    save_file(tensors, str(dense / "model.safetensors"), metadata={"format": "pt"})
    return folder
