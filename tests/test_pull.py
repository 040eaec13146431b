"""`glmstack pull`, `glmstack models` and `glmstack rm` through the real CLI, with the real huggingface_hub and
modelscope-hub talking to a stand-in of the hubs' download endpoints on 127.0.0.1 (tests/hub_standin.py).

The repos served are tiny random Llama checkpoints written here, with a small trained BPE tokenizer, as
safetensors and as GGUF files; after a pull, the model loads by name and answers.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from hub_standin import HubStandin, commit_of
from safetensors.numpy import save as safetensors_bytes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import glmstack
from glmstack.cli.main import main
from glmstack.engine.loading.catalog import BUNDLED_NAME
from glmstack.protocol import SamplingParams

HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# huggingface_hub's http_get writes what it receives in pieces of this size, so a cut connection keeps
# whole pieces only: the interrupted download below needs a weights file larger than one piece.
HF_WRITE_PIECE = 10 * 1024 * 1024


# ---- the tiny repos --------------------------------------------------------------------------------------


def tokenizer_files() -> dict[str, bytes]:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": backend.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


VOCAB = Tokenizer.from_str(tokenizer_files()["tokenizer.json"].decode()).get_vocab_size()


def llama_weights(intermediate: int = 96) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32),
               "lm_head.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        weights |= {
            layer + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            layer + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
            layer + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN),
            layer + "self_attn.k_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
            layer + "self_attn.v_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
            layer + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
            layer + "mlp.gate_proj.weight": w(intermediate, HIDDEN),
            layer + "mlp.up_proj.weight": w(intermediate, HIDDEN),
            layer + "mlp.down_proj.weight": w(HIDDEN, intermediate),
        }
    return weights


def llama_config(intermediate: int = 96, **overrides) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": intermediate, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
            **overrides}


def safetensors_repo(intermediate: int = 96, **config_overrides) -> dict[str, bytes]:
    """A Hugging Face Llama repo as published, with files the loader never reads next to the ones it does."""
    weights = llama_weights(intermediate)
    return {
        "config.json": json.dumps(llama_config(intermediate, **config_overrides)).encode(),
        "generation_config.json": json.dumps({"temperature": 0.6, "top_p": 0.9}).encode(),
        **tokenizer_files(),
        "model.safetensors": safetensors_bytes(weights),
        "LICENSE": b"the model's terms",
        # never fetched: code, a pickle duplicate of the weights, docs, other formats in subfolders
        "modeling_llama.py": b"raise SystemExit('remote code must never be fetched')",
        "pytorch_model.bin": b"a pickle duplicate of the weights",
        "README.md": b"# tiny",
        ".gitattributes": b"*.safetensors filter=lfs",
        "onnx/model.onnx": b"onnx",
        "original/consolidated.00.pth": b"pickle",
    }


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_file(folder: Path, quant: gguf.GGMLQuantizationType) -> bytes:
    """A Llama GGUF whose decoder-layer matrices are `quant` blocks, with its vocabulary in the metadata."""
    path = folder / f"tiny-{quant.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(96)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    vocab = json.loads(tokenizer_files()["tokenizer.json"])["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    for name, array in llama_weights().items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            gguf_name = f"blk.{index}.{GGUF_NAMES[module]}.{kind}"
        else:
            gguf_name = GGUF_NAMES[name]
        if gguf_name.startswith("blk.") and array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_repo() -> dict[str, bytes]:
    return safetensors_repo()


@pytest.fixture(scope="module")
def gguf_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("gguf")
    return {"tiny-Q4_0.gguf": gguf_file(folder, gguf.GGMLQuantizationType.Q4_0),
            "tiny-Q8_0.gguf": gguf_file(folder, gguf.GGMLQuantizationType.Q8_0),
            "tiny-Q6_K-00001-of-00002.gguf": b"GGUF part 1", "tiny-Q6_K-00002-of-00002.gguf": b"GGUF part 2",
            "README.md": b"# tiny GGUF"}


# ---- the hubs and the home ------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    standin = HubStandin()
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", standin.url)
    with standin.running():
        yield standin


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GLMSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GLMSTACK_NATIVE", "0")  # tiny float models: no kernels to build
    for variable in ("GLMSTACK_MODEL", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))
    folder = tmp_path / "home" / "models"
    folder.mkdir(parents=True)
    return folder


def glmstack_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("glmstack: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def registered(models_dir: Path) -> list[str]:
    """What names find in the models folder (staging folders are hidden)."""
    return sorted(p.name for p in models_dir.iterdir() if not p.name.startswith("."))


def first_token(model: glmstack.ChatModel) -> str:
    events = list(model.stream_messages([{"role": "user", "content": "hello world"}],
                                        SamplingParams(max_tokens=1, do_sample=False)))
    assert events[-1].usage.completion_tokens == 1
    return "".join(e.text for e in events)


# ---- 1. a safetensors repo ------------------------------------------------------------------------------


def test_pull_fetches_only_what_the_loader_reads_and_the_name_loads(
    hub: HubStandin, models_dir: Path, tiny_repo: dict[str, bytes], tmp_path: Path, capsys
) -> None:
    hub.add("glmtest/Tiny-Llama", tiny_repo)
    code, out, err = glmstack_cli(capsys, "pull", "glmtest/Tiny-Llama")
    assert code == 0, err
    assert out.strip() == str(models_dir / "tiny-llama") and "glmstack chat --model tiny-llama" in err
    fetched = {name for name, _ in hub.downloads()}
    assert fetched == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "model.safetensors", "LICENSE"}
    assert registered(models_dir) == ["tiny-llama"] and not (models_dir / ".partial").exists()
    assert sorted(p.name for p in (models_dir / "tiny-llama").iterdir()) == sorted(fetched | {".pull.json"})
    record = json.loads((models_dir / "tiny-llama" / ".pull.json").read_text())
    assert record == {"source": "huggingface", "endpoint": hub.url, "repo": "glmtest/Tiny-Llama",
                      "commit": commit_of("glmtest/Tiny-Llama")}

    code, out, _ = glmstack_cli(capsys, "models")
    assert code == 0
    header, row = out.splitlines()[0].split(), next(line for line in out.splitlines() if line.startswith("tiny"))
    assert header == ["NAME", "ARCHITECTURE", "QUANTIZATION", "FORMAT", "SIZE", "PATH"]
    assert row.split()[:4] == ["tiny-llama", "LlamaForCausalLM", "float32", "safetensors"]
    assert row.endswith(str(models_dir / "tiny-llama"))

    original = tmp_path / "original"
    original.mkdir()
    for name, data in tiny_repo.items():
        if "/" not in name:
            (original / name).write_bytes(data)
    pulled, _ = glmstack.load("tiny-llama", device="cpu", dtype="float32")
    reference, _ = glmstack.load(original, device="cpu", dtype="float32")
    assert first_token(pulled) == first_token(reference)
    assert pulled.generation_defaults.temperature == 0.6  # generation_config.json came along


# ---- 2. a GGUF repo --------------------------------------------------------------------------------------


def test_gguf_repo_needs_quant_to_choose_and_gets_one_file(
    hub: HubStandin, models_dir: Path, gguf_repo: dict[str, bytes], capsys
) -> None:
    hub.add("glmtest/Tiny-GGUF", gguf_repo)
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny-GGUF")
    assert code == 2
    line = error_line(err)
    assert "has 3 GGUF models; choose one with --quant: Q4_0 (tiny-Q4_0.gguf), " in line
    assert "Q6_K (tiny-Q6_K-00001-of-00002.gguf, split in 2 files), Q8_0 (tiny-Q8_0.gguf)" in line
    assert hub.downloads() == [] and registered(models_dir) == []

    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny-GGUF", "--quant", "q4_k_m")
    assert code == 2 and "no GGUF file of glmtest/Tiny-GGUF@main matches --quant q4_k_m" in error_line(err)
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny-GGUF", "--quant", "Q6_K")
    assert code == 2 and "tiny-Q6_K-00001-of-00002.gguf is part 1 of a GGUF split in 2 files" in error_line(err)

    code, out, err = glmstack_cli(capsys, "pull", "glmtest/Tiny-GGUF", "--quant", "q8_0")
    assert code == 0, err
    assert hub.downloads() == [("tiny-Q8_0.gguf", None)]
    assert registered(models_dir) == ["tiny-q8_0"]
    assert (models_dir / "tiny-q8_0" / "tiny-Q8_0.gguf").read_bytes() == gguf_repo["tiny-Q8_0.gguf"]
    code, out, _ = glmstack_cli(capsys, "models")
    row = next(line for line in out.splitlines() if line.startswith("tiny-q8_0"))
    assert row.split()[:4] == ["tiny-q8_0", "llama", "Q8_0", "gguf"]


# ---- 3. an interrupted download ---------------------------------------------------------------------------


def test_interrupted_download_registers_nothing_and_resumes_with_a_range_request(
    hub: HubStandin, models_dir: Path, capsys
) -> None:
    files = safetensors_repo(intermediate=8192)  # 12.6 MB of weights: more than one piece
    weights = files["model.safetensors"]
    assert len(weights) > HF_WRITE_PIECE + 1_000_000
    hub.add("glmtest/Big-FFN", files, drop_after={"model.safetensors": HF_WRITE_PIECE + 500_000})

    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Big-FFN")
    assert code == 2
    line = error_line(err)
    assert f"{hub.url} answered HTTP 503" in line and "run the same command again to resume" in line
    assert f"{HF_WRITE_PIECE:,} of {len(weights):,} bytes of model.safetensors are kept" in line
    assert registered(models_dir) == []
    partial = models_dir / ".partial" / "big-ffn" / "model.safetensors.incomplete"
    assert partial.read_bytes() == weights[:HF_WRITE_PIECE]

    hub.down = False  # the hub is back
    hub.requests.clear()
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Big-FFN")
    assert code == 0, err
    assert [r for name, r in hub.downloads() if name == "model.safetensors"] == [f"bytes={HF_WRITE_PIECE}-"]
    assert {name for name, _ in hub.downloads()} == {"model.safetensors"}  # the small files were kept too
    assert (models_dir / "big-ffn" / "model.safetensors").read_bytes() == weights
    assert registered(models_dir) == ["big-ffn"] and not (models_dir / ".partial").exists()


# ---- 4. what the hub refuses -----------------------------------------------------------------------------


def test_gated_repo_says_how_to_get_access(hub: HubStandin, models_dir: Path, tiny_repo, capsys) -> None:
    hub.add("glmtest/Gated", tiny_repo, gated=True)
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Gated")
    assert code == 2
    line = error_line(err)
    assert "glmtest/Gated is gated" in line and f"{hub.url}/glmtest/Gated" in line and "HF_TOKEN" in line
    assert "resume" not in line
    assert registered(models_dir) == [] and not (models_dir / ".partial").exists()


def test_unknown_repo_revision_and_unreachable_hub_name_the_endpoint(
    hub: HubStandin, models_dir: Path, tiny_repo, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/nothing-here")
    assert code == 2 and f"glmtest/nothing-here not found on {hub.url}" in error_line(err)

    hub.add("glmtest/Tiny", tiny_repo)
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny@v9")
    assert code == 2 and f"glmtest/Tiny has no revision 'v9' on {hub.url}" in error_line(err)

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny")
    assert code == 2 and f"cannot reach {closed}" in error_line(err)
    assert registered(models_dir) == [] and not (models_dir / ".partial").exists()

    code, _, err = glmstack_cli(capsys, "pull", "not a repo")
    assert code == 2 and "expected OWNER/NAME[@REVISION]" in error_line(err)


# ---- 5. a small disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(models_dir: Path) -> Iterator[Path]:
    """The models folder on a 256 KB tmpfs (the tiny weights are about 400 KB)."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(models_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield models_dir
    finally:
        subprocess.run(["umount", str(models_dir)], check=True)


def test_too_little_disk_space_is_refused_before_the_weights(
    hub: HubStandin, small_disk: Path, tiny_repo, capsys
) -> None:
    hub.add("glmtest/Tiny", tiny_repo)
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny")
    assert code == 2
    line = error_line(err)
    free = shutil.disk_usage(small_disk).free
    assert "not enough disk space" in line and f"{small_disk} has" in line and f"({free:,} bytes) free" in line
    assert "model.safetensors" not in {name for name, _ in hub.downloads()}
    assert registered(small_disk) == []


def test_a_disk_that_fills_during_the_download_registers_nothing(
    hub: HubStandin, small_disk: Path, tiny_repo, capsys
) -> None:
    hub.add("glmtest/Tiny", tiny_repo, listed_sizes={"model.safetensors": 1000})  # the listing understates it
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny")
    assert code == 2
    line = error_line(err)
    assert f"the disk holding {small_disk} is full: model.safetensors stopped at" in line
    assert "glmstack rm tiny" in line
    assert registered(small_disk) == []
    code, _, err = glmstack_cli(capsys, "rm", "tiny")  # drops the partial download
    assert code == 0 and not (small_disk / ".partial").exists()


# ---- 6. rm ---------------------------------------------------------------------------------------------


def test_rm_removes_a_pulled_model_and_refuses_everything_else(
    hub: HubStandin, models_dir: Path, tiny_repo, tmp_path: Path, capsys
) -> None:
    hub.add("glmtest/Tiny", tiny_repo)
    assert glmstack_cli(capsys, "pull", "glmtest/Tiny", "--name", "mine")[0] == 0
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Tiny", "--name", "mine")
    assert code == 2 and "a model named 'mine' already exists" in error_line(err) and "glmstack rm mine" in err

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (models_dir / "linked").symlink_to(outside)
    refusals = {
        BUNDLED_NAME: "is the bundled model", "default": "is the bundled model",
        "../home": "not a model name", "mine/config.json": "not a model name", "..": "not a model name",
        "/etc": "not a model name", "linked": "outside the models folder", "nobody": "no model named 'nobody'",
    }
    for name, problem in refusals.items():
        code, _, err = glmstack_cli(capsys, "rm", name)
        assert code == 2 and problem in error_line(err), name
    assert (outside / "config.json").exists() and (models_dir / "mine" / "config.json").exists()

    (models_dir / "alias").symlink_to(models_dir / "mine")  # a link inside the folder: only the link goes
    assert glmstack_cli(capsys, "rm", "alias")[0] == 0
    assert not (models_dir / "alias").is_symlink() and (models_dir / "mine" / "config.json").exists()

    code, _, err = glmstack_cli(capsys, "rm", "mine")
    assert code == 0 and f"removed {models_dir / 'mine'}" in err
    assert registered(models_dir) == ["linked"] and outside.exists()
    code, _, err = glmstack_cli(capsys, "rm", "mine")
    assert code == 2 and "no model named 'mine'" in error_line(err)


# ---- 7. a repo glmstack cannot load ----------------------------------------------------------------------


def test_a_repo_the_loader_refuses_is_not_added(hub: HubStandin, models_dir: Path, tiny_repo, capsys) -> None:
    hub.add("glmtest/Fancy", safetensors_repo(architectures=["FancyNewForCausalLM"], model_type="fancy"))
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Fancy")
    assert code == 2
    line = error_line(err)
    assert "glmtest/Fancy was not added: glmstack cannot load it: unsupported architecture FancyNewForCausalLM" in line
    assert "model.safetensors" not in {name for name, _ in hub.downloads()}  # refused before the weights

    hub.add("glmtest/Truncated", tiny_repo | {"model.safetensors": tiny_repo["model.safetensors"][:5000]})
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Truncated")
    assert code == 2
    assert "glmtest/Truncated was not added: glmstack cannot load it: model.safetensors: " in error_line(err)

    hub.add("glmtest/Garbled", tiny_repo | {"tokenizer.json": b'{"version": "1.0", "model": 5}'})
    code, _, err = glmstack_cli(capsys, "pull", "glmtest/Garbled")
    assert code == 2 and "glmtest/Garbled was not added: glmstack cannot load it: " in error_line(err)
    assert registered(models_dir) == [] and not (models_dir / ".partial").exists()


# ---- ModelScope ------------------------------------------------------------------------------------------


def test_modelscope_source(hub: HubStandin, models_dir: Path, tiny_repo, capsys) -> None:
    hub.add("ZhipuAI/Tiny-Llama", tiny_repo)
    code, out, err = glmstack_cli(capsys, "pull", "ZhipuAI/Tiny-Llama", "--source", "modelscope")
    assert code == 0, err
    assert {name for name, _ in hub.downloads()} == {"config.json", "generation_config.json", "tokenizer.json",
                                                     "tokenizer_config.json", "model.safetensors", "LICENSE"}
    assert (models_dir / "tiny-llama" / "model.safetensors").read_bytes() == tiny_repo["model.safetensors"]
    model, _ = glmstack.load("tiny-llama", device="cpu", dtype="float32")
    assert first_token(model)

    code, _, err = glmstack_cli(capsys, "pull", "ZhipuAI/missing", "--source", "modelscope")
    assert code == 2 and f"ZhipuAI/missing not found on {hub.url}" in error_line(err)

    hub.add("ZhipuAI/Gated", tiny_repo, gated=True)
    code, _, err = glmstack_cli(capsys, "pull", "ZhipuAI/Gated", "--source", "modelscope")
    line = error_line(err)
    assert code == 2 and f"{hub.url}/models/ZhipuAI/Gated" in line and "MODELSCOPE_API_TOKEN" in line
    assert registered(models_dir) == ["tiny-llama"] and not (models_dir / ".partial").exists()

