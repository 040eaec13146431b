"""Sentence embeddings on our BERT encoder (glmstack/engine/models/bert.py, glmstack/engine/embeddings.py),
checked against the reference implementations on the same folders: sentence-transformers' SentenceTransformer
for the pipeline (tokenizing, truncation, pooling, normalizing) and transformers' BertModel for the encoder.

- The bundled all-MiniLM-L6-v2 on English, Chinese and mixed texts of very different lengths in one batch, so
  padding has to be masked right.
- A tiny random BERT saved as a sentence-transformers folder of our own making, with [CLS] or max pooling, the
  tanh GELU and a short max_seq_length: the parts the bundled model does not exercise.
- A tiny random XLM-RoBERTa (and RoBERTa) with a sentencepiece-style Unigram tokenizer, saved by
  sentence-transformers itself (its version 6 folder format): RoBERTa's position ids, [CLS] pooling, <s> </s>.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from glmstack.engine.embeddings import (
    BUNDLED_NAME,
    SentenceEmbedder,
    bundled_embedding_model_dir,
    load_embedder,
    read_pipeline,
)
from glmstack.engine.models.bert import load_bert

os.environ["HF_HUB_OFFLINE"] = "1"  # the reference loads local folders only; never reach the hub

TOLERANCE = 1e-5
TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "知识库检索增强生成",
    "glmstack 在本地运行 GLM 模型, and serves the platform API from the same process.",
    "   Leading and trailing spaces are stripped, as sentence-transformers does.   ",
    "A long one: " + " ".join(f"word{i} follows another" for i in range(150)),  # past 256 tokens: truncated
    "短",
    "Mixed punctuation!? Numbers 12345, e-mail a@b.cn; 中文标点，。！",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def bundled() -> SentenceEmbedder:
    return load_embedder(bundled_embedding_model_dir())


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_embedding_model_dir()), device="cpu", local_files_only=True)


def reference_hidden_states(reference, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """transformers' BertModel (inside the SentenceTransformer) on the reference's own tokenization."""
    features = reference.tokenize(texts)
    with torch.inference_mode():
        states = reference[0].auto_model(input_ids=features["input_ids"],
                                         attention_mask=features["attention_mask"]).last_hidden_state
    mask = features["attention_mask"]
    ids = [row[: int(m.sum())].tolist() for row, m in zip(features["input_ids"], mask, strict=True)]
    return states, mask, ids


def test_the_bundled_model_is_found_and_described(bundled: SentenceEmbedder) -> None:
    info = bundled.info()
    assert (info.name, info.dimensions, info.max_tokens, info.matryoshka_dims) == (BUNDLED_NAME, 384, 256, ())
    assert bundled.pipeline.pooling == "mean"


def test_tokens_match_sentence_transformers(bundled: SentenceEmbedder, reference) -> None:
    _, _, reference_ids = reference_hidden_states(reference, TEXTS)
    ours = bundled.tokenize(TEXTS)
    assert ours == reference_ids
    assert max(len(ids) for ids in ours) == 256  # the long text was truncated to max_seq_length


def test_hidden_states_match_transformers_with_padding(bundled: SentenceEmbedder, reference) -> None:
    states, mask, ids = reference_hidden_states(reference, TEXTS)
    ours, our_mask = bundled.hidden_states(ids)
    assert torch.equal(our_mask, mask)
    real = mask.bool()
    assert (ours[real] - states[real]).abs().max().item() < TOLERANCE


def test_sentence_vectors_match_sentence_transformers(bundled: SentenceEmbedder, reference) -> None:
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    batch = bundled.embed(TEXTS)
    vectors = torch.tensor(batch.vectors)
    assert vectors.shape == (len(TEXTS), 384)
    assert (vectors - expected).abs().max().item() < TOLERANCE
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    assert batch.prompt_tokens == sum(len(ids) for ids in bundled.tokenize(TEXTS))


def test_small_batches_give_the_same_vectors_in_input_order(bundled: SentenceEmbedder) -> None:
    whole = torch.tensor(bundled.embed(TEXTS).vectors)
    small = SentenceEmbedder(bundled.folder, batch_size=3)  # sorted into 3 batches of different lengths
    assert (torch.tensor(small.embed(TEXTS).vectors) - whole).abs().max().item() < TOLERANCE
    one_by_one = torch.tensor([bundled.embed([text]).vectors[0] for text in TEXTS])
    assert (one_by_one - whole).abs().max().item() < TOLERANCE


def test_concurrent_callers_get_their_own_vectors(bundled: SentenceEmbedder) -> None:
    expected = {text: bundled.embed([text]).vectors[0] for text in TEXTS}
    results: dict[str, list[float]] = {}

    def call(text: str) -> None:
        results[text] = bundled.embed([text, "padding partner of another length"]).vectors[0]

    threads = [threading.Thread(target=call, args=(text,)) for text in TEXTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for text in TEXTS:
        assert max(abs(a - b) for a, b in zip(results[text], expected[text], strict=True)) < TOLERANCE


def test_no_texts_embed_to_nothing(bundled: SentenceEmbedder) -> None:
    batch = bundled.embed([])
    assert (batch.vectors, batch.prompt_tokens) == ([], 0)


def tiny_sentence_transformers_folder(folder: Path, *, pooling: str, hidden_act: str, task_head: bool) -> None:
    """A random 2-layer BERT (the bundled model's vocabulary and tokenizer) as a sentence-transformers folder."""
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, hidden_act=hidden_act)
    torch.manual_seed(0)
    model = (transformers.BertForMaskedLM if task_head else transformers.BertModel)(config)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_embedding_model_dir() / name, folder / name)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    flags = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
             "pooling_mode_max_tokens": pooling == "max", "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))


@pytest.mark.parametrize(("pooling", "hidden_act", "task_head"),
                         [("cls", "gelu", False), ("max", "gelu_new", True), ("mean", "gelu", False)])
def test_a_tiny_random_bert_matches_transformers_and_sentence_transformers(
    tmp_path: Path, pooling: str, hidden_act: str, task_head: bool
) -> None:
    import transformers
    from sentence_transformers import SentenceTransformer

    tiny_sentence_transformers_folder(tmp_path, pooling=pooling, hidden_act=hidden_act, task_head=task_head)
    assert read_pipeline(tmp_path).pooling == pooling

    # the encoder: logits (last hidden states) of transformers' BertModel on a padded batch
    hf = transformers.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    input_ids = torch.tensor([[101, 7592, 2088, 999, 102, 0, 0], [101, 2023, 2003, 1037, 2936, 6251, 102]])
    mask = (input_ids != 0).long()
    ours = load_bert(tmp_path)
    with torch.inference_mode():
        expected = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
        states = ours(input_ids, mask)
    assert (states[mask.bool()] - expected[mask.bool()]).abs().max().item() < TOLERANCE

    # the pipeline: sentence vectors, with truncation at max_seq_length 24
    reference = SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True)
    embedder = load_embedder(tmp_path, "tiny")
    assert embedder.info().max_tokens == 24
    vectors = torch.tensor(embedder.embed(TEXTS).vectors)
    expected_vectors = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    assert (vectors - expected_vectors).abs().max().item() < TOLERANCE


def tiny_xlm_roberta_folder(folder: Path, *, model_type: str, task_head: bool) -> Path:
    """A random 2-layer XLM-RoBERTa (or RoBERTa) with a Unigram tokenizer trained on TEXTS, written by
    sentence-transformers' own Transformer + Pooling(cls) + Normalize and SentenceTransformer.save; returns the
    sentence-transformers folder (the plain Hugging Face folder it was built from is folder / "hf")."""
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    # XLM-R's special tokens at XLM-R's ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4
    trained.train_from_iterator(TEXTS, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    vocab = [tuple(piece) for piece in json.loads(trained.to_str())["model"]["vocab"]]
    tokenizer = transformers.XLMRobertaTokenizer(vocab=vocab)  # adds the "<s> $A </s>" post-processor

    config_class, model_class = {
        ("xlm-roberta", False): (transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
        ("roberta", True): (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
    }[model_type, task_head]
    config = config_class(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=34, type_vocab_size=1,
                          layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    hf_dir = folder / "hf"
    model_class(config).save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    modules = [Transformer(str(hf_dir), max_seq_length=24), Pooling(32, "cls"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "st"))
    return folder / "st"


@pytest.mark.parametrize(("model_type", "task_head"), [("xlm-roberta", False), ("roberta", True)])
def test_a_tiny_random_xlm_roberta_matches_transformers_and_sentence_transformers(
    tmp_path: Path, model_type: str, task_head: bool
) -> None:
    import transformers
    from sentence_transformers import SentenceTransformer

    folder = tiny_xlm_roberta_folder(tmp_path, model_type=model_type, task_head=task_head)
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    reference = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    embedder = load_embedder(folder, "tiny-xlmr")
    assert (embedder.pipeline.pooling, embedder.info().max_tokens) == ("cls", 24)
    assert embedder.model.config.roberta_positions and embedder.model.config.pad_token_id == 1

    # the tokenizer: <s> ... </s>, truncated to 24 tokens, as sentence-transformers tokenizes
    states, mask, reference_ids = reference_hidden_states(reference, TEXTS)
    assert embedder.tokenize(TEXTS) == reference_ids
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in reference_ids) and max(map(len, reference_ids)) == 24

    # the encoder on a padded batch (<pad> is 1, positions count from 2): transformers' own model class too
    ours, our_mask = embedder.hidden_states(reference_ids)
    assert torch.equal(our_mask, mask)
    hf_class = transformers.XLMRobertaModel if model_type == "xlm-roberta" else transformers.RobertaModel
    hf = hf_class.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    padded = torch.tensor([ids + [1] * (24 - len(ids)) for ids in reference_ids])
    with torch.inference_mode():
        expected = hf(input_ids=padded, attention_mask=mask).last_hidden_state
        direct = load_bert(tmp_path / "hf")(padded, mask)  # RobertaForMaskedLM's names start with "roberta."
    real = mask.bool()
    assert (ours[real] - expected[real]).abs().max().item() < TOLERANCE
    assert (direct[real] - expected[real]).abs().max().item() < TOLERANCE
    assert (ours[real] - states[real]).abs().max().item() < TOLERANCE

    # the pipeline: normalized [CLS] vectors
    expected_vectors = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    vectors = torch.tensor(embedder.embed(TEXTS).vectors)
    assert vectors.shape == (len(TEXTS), 32)
    assert (vectors - expected_vectors).abs().max().item() < TOLERANCE

    # with no length in the folder, the position table bounds it: 34 positions, 2 before the first token
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 1000}))
    assert read_pipeline(folder).max_seq_length == 32


def test_unsupported_folders_are_refused_naming_the_problem(tmp_path: Path) -> None:
    tiny_sentence_transformers_folder(tmp_path, pooling="mean", hidden_act="gelu", task_head=False)
    modules = json.loads((tmp_path / "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(
        [*modules, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        load_embedder(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="mean_sqrt_len"):
        load_embedder(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_embedder(tmp_path / "missing")


def test_serve_loads_one_model_per_folder(tmp_path: Path) -> None:
    from glmstack.cli.serve import load_embedders
    from glmstack.settings import Settings

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    tiny_sentence_transformers_folder(tiny, pooling="mean", hidden_act="gelu", task_head=False)
    settings = Settings.from_env({"GLMSTACK_HOME": str(tmp_path),
                                  "GLMSTACK_EMBEDDING_MODELS": f"embedding-3={tiny},tiny-too={tiny}"})
    assert settings.embedding_models == {"embedding-3": str(tiny), "tiny-too": str(tiny)}
    embedders = load_embedders(settings)
    assert sorted(embedders) == ["embedding-2", "embedding-3", "tiny-too"]
    assert embedders["embedding-3"] is embedders["tiny-too"] and embedders["embedding-3"].info().dimensions == 32
    assert embedders["embedding-2"].info().name == BUNDLED_NAME  # not named: the bundled model
    default = load_embedders(Settings.from_env({"GLMSTACK_HOME": str(tmp_path)}))
    assert sorted(default) == ["embedding-2", "embedding-3"] and default["embedding-2"] is default["embedding-3"]


def test_a_pickle_folder_converted_by_glmstack_convert_embeds_the_same(tmp_path: Path) -> None:
    """Some hub folders (bge-m3's, for one) ship only pytorch_model.bin: `glmstack convert` rewrites them as
    safetensors and keeps the sentence-transformers module folders (1_Pooling/) beside them."""
    import shutil

    from safetensors.torch import load_file

    from glmstack.engine.loading.convert import convert_checkpoint

    source = tmp_path / "pickled"
    shutil.copytree(bundled_embedding_model_dir(), source)
    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    converted = convert_checkpoint(source, tmp_path / "converted")
    assert (converted / "1_Pooling" / "config.json").is_file() and not list(converted.rglob("*.bin"))
    texts = ["The printer needs toner.", "打印机需要墨粉。"]
    assert load_embedder(converted).embed(texts).vectors == load_embedder(bundled_embedding_model_dir()).embed(
        texts).vectors
