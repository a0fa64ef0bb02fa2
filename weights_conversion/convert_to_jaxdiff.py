"""Converts a diffusers pipeline or one model folder to a checked jaxdiff copy, with a report.

    python weights_conversion/convert_to_jaxdiff.py SRC --out DIR [--dtype float32|bfloat16|float16]
        [--variant fp16] [--allow-pickle] [--no-parity] [--overwrite]

``SRC`` is a Hub repo id, a local diffusers pipeline folder (with ``model_index.json``) or a
single component folder (``config.json`` + weights). Every model component is loaded strictly
through jaxdiff (no torch): every missing, unexpected or mis-shaped tensor is an error. Models
are written back with jaxdiff's ``save_pretrained`` in diffusers layout as safetensors, in the
storage dtype ``--dtype``: pickled ``.bin`` inputs (read only with ``--allow-pickle``) become
safetensors, and an ``fp16`` variant becomes a plain ``diffusion_pytorch_model.safetensors``.
Non-model components (scheduler config, tokenizer files, feature extractor) are copied;
schedulers are first loaded with jaxdiff to check that it supports them. Model classes jaxdiff
does not have (e.g. the safety checker) are left out and set to ``[null, null]`` in
``model_index.json``, as diffusers does for a removed component.

``DIR/conversion_report.json`` and ``DIR/conversion_report.md`` list, per component: the class,
the parameter count, the dtype(s) stored in the source (from the safetensors headers), the dtype
saved, whether the written files reload in jaxdiff to exactly the saved params, and, when torch,
diffusers and transformers are importable (and ``--no-parity`` is not given), the relative L2
between jaxdiff and the PyTorch reference loaded from the same source folder, both in float32,
on a small fixed input (``weights_conversion/parity_adapters.py``). torch is imported only for
that check.

The converter refuses to write into a non-empty ``DIR`` unless ``--overwrite`` is given (which
empties it first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import hub  # noqa: E402
from jaxdiff.loaders.safetensors_io import read_header  # noqa: E402
from jaxdiff.loaders.weights import find_weight_files  # noqa: E402
from jaxdiff.models.modeling_utils import cast_floating  # noqa: E402
from jaxdiff.pipelines.pipeline_utils import COMPONENT_CLASSES, MODEL_INDEX, import_class  # noqa: E402
from weights_conversion import parity_adapters  # noqa: E402

REPORT_JSON = "conversion_report.json"
REPORT_MD = "conversion_report.md"
STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# safetensors header dtype names -> numpy names
_ST_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")


class ConversionError(ValueError):
    """The source cannot be converted as asked (layout, classes, output folder)."""


# ----------------------------------------------------------------------------- helpers


def _local_source(src: str, variant: str | None, allow_pickle: bool, **hub_kwargs) -> Path:
    """A local folder for ``src``: itself, or a Hub snapshot of the files the converter reads."""
    if os.path.isdir(src):
        return Path(src).resolve()
    if os.path.exists(src):
        raise ConversionError(f"SRC {src!r} is a file; expected a folder or a Hub repo id")
    if not hub._is_repo_id(src):
        raise hub.HubFileNotFoundError(
            f"SRC {src!r} is neither an existing folder nor a Hub repo id (expected 'owner/name')"
        )
    import huggingface_hub

    # Configs, tokenizer files and the weights of the asked variant only: not the big
    # single-file checkpoints that some repos keep at their root.
    v = f".{variant}" if variant else ""
    patterns = ["*.json", "*.txt", "tokenizer*/*", f"*model{v}.safetensors"]
    patterns.append(f"*model{v}-*-of-*.safetensors" if not variant else f"*model{v}-*.safetensors")
    if allow_pickle:
        patterns += [f"*pytorch_model{v}.bin", f"*pytorch_model{v}-*.bin"]
    offline = hub_kwargs.get("local_files_only")
    offline = hub._offline() if offline is None else offline
    try:
        path = huggingface_hub.snapshot_download(
            src,
            revision=hub_kwargs.get("revision"),
            cache_dir=hub_kwargs.get("cache_dir"),
            token=hub_kwargs.get("token"),
            local_files_only=offline,
            allow_patterns=patterns,
        )
    except Exception as err:  # noqa: BLE001 - one clear error for every Hub failure
        how = (
            "HF_HUB_OFFLINE is set (or local_files_only), so only the cache was searched"
            if offline
            else "the Hub could not be reached or the repo does not exist"
        )
        raise hub.HubFileNotFoundError(
            f"could not get Hub repo {src!r} ({how}): {type(err).__name__}: {err}. "
            "Pass a local folder in diffusers layout instead."
        ) from err
    return Path(path)


def _component_class(folder: Path) -> str:
    """The class named by a component's ``config.json`` (diffusers or transformers)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{folder} has no config.json (files: {sorted(os.listdir(folder))})")
    cfg = json.loads(cfg_path.read_text())
    name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if not name:
        raise ConversionError(
            f"{cfg_path} names no class: expected '_class_name' (diffusers) or "
            "'architectures' (transformers)"
        )
    return name


def _is_model_class(name: str) -> bool:
    return name in COMPONENT_CLASSES and hasattr(
        import_class(name, COMPONENT_CLASSES, "component class"), "apply"
    )


def _header_stats(files: list[str]) -> tuple[dict[str, int], int, int]:
    """(tensor count per dtype, number of tensors, number of elements) of safetensors files."""
    dtypes: dict[str, int] = {}
    tensors = numel = 0
    for path in files:
        header, _ = read_header(path)
        header.pop("__metadata__", None)
        for info in header.values():
            name = _ST_NAMES.get(info["dtype"], info["dtype"])
            dtypes[name] = dtypes.get(name, 0) + 1
            tensors += 1
            numel += int(np.prod(info["shape"], dtype=np.int64))
    return dtypes, tensors, numel


def _pickle_stats(files: list[str]) -> tuple[dict[str, int], int, int]:
    import torch

    dtypes: dict[str, int] = {}
    tensors = numel = 0
    for path in files:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        for v in sd.values():
            name = str(v.dtype).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + 1
            tensors += 1
            numel += v.numel()
    return dtypes, tensors, numel


def _param_count(params: dict) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(params)))


def _trees_equal(a: dict, b: dict) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    return all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


def _prepare_out(out: Path, sources: list[Path], overwrite: bool) -> None:
    out_r = out.resolve()
    for src in sources:
        src_r = src.resolve()
        if out_r == src_r or out_r in src_r.parents or src_r in out_r.parents:
            raise ConversionError(
                f"--out {out} overlaps the source {src}: choose a separate output folder"
            )
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out} is not empty ({sorted(p.name for p in out.iterdir())[:8]}); "
                "pass --overwrite (overwrite=True) to replace its contents"
            )
        if out_r in (Path.home().resolve(), Path("/"), Path.cwd().resolve()):
            raise ConversionError(f"refusing to empty {out_r} with --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- one component


def convert_model(
    src: Path,
    subfolder: str | None,
    out: Path,
    class_name: str,
    dtype: str = "float32",
    variant: str | None = None,
    allow_pickle: bool = False,
    parity: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Loads one model component with jaxdiff, saves it to ``out``, checks it; returns its report.

    Args:
        src: local source folder (pipeline or component).
        subfolder: the component's subfolder in ``src`` (None for a component folder).
        out: the folder to write ``config.json`` + ``<weights_name>.safetensors`` into.
        class_name: diffusers/transformers class name (key of ``COMPONENT_CLASSES``).
        dtype: storage dtype of the written weights.
        variant, allow_pickle: which source weight files to read.
        parity: run the PyTorch parity check (when torch, diffusers, transformers import).
        seed: seed of the parity input.
    """
    cls = import_class(class_name, COMPONENT_CLASSES, "component class")
    start = time.perf_counter()
    files = find_weight_files(
        src, subfolder, cls.weights_name, variant=variant, allow_pickle=allow_pickle
    )
    pickled = [f for f in files if not f.endswith(".safetensors")]
    if pickled:
        stored, n_tensors, numel = _pickle_stats(files)
    else:
        stored, n_tensors, numel = _header_stats(files)
    try:
        module, params = cls.from_pretrained(
            src, subfolder=subfolder, dtype=jnp.float32, variant=variant, allow_pickle=allow_pickle
        )
    except Exception as err:
        err.add_note(
            f"while loading component {subfolder or src.name!r} ({class_name}) with jaxdiff"
        )
        raise
    report: dict[str, Any] = {
        "class": class_name,
        "jaxdiff_class": COMPONENT_CLASSES[class_name],
        "source_files": [os.path.relpath(f, src) for f in files],
        "source_format": "pickle" if pickled else "safetensors",
        "stored_dtypes": stored,
        "source_tensors": n_tensors,
        "source_numel": numel,
        "param_count": _param_count(params),
        "saved_dtype": dtype,
    }
    if parity and parity_adapters.reference_available():
        errors = parity_adapters.parity_from_folder(
            class_name, module, params, src, subfolder, variant, allow_pickle, seed
        )
        report["parity"] = errors
        report["parity_max"] = max(errors.values())
    else:
        report["parity"] = None
        report["parity_skipped"] = (
            "--no-parity" if not parity else "torch, diffusers or transformers not importable"
        )
    module.save_pretrained(out, params, dtype=STORAGE_DTYPES[dtype])
    expected = cast_floating(cast_floating(params, STORAGE_DTYPES[dtype]), jnp.float32)
    del params
    saved_files = sorted(str(p) for p in out.glob("*.safetensors"))
    saved, saved_tensors, saved_numel = _header_stats(saved_files)
    _, reloaded = cls.from_pretrained(out, dtype=jnp.float32)
    report.update(
        saved_files=[os.path.basename(f) for f in saved_files],
        saved_dtypes=saved,
        saved_tensors=saved_tensors,
        saved_numel=saved_numel,
        reload_exact=_trees_equal(reloaded, expected),
        seconds=round(time.perf_counter() - start, 2),
    )
    if saved_numel != report["param_count"]:
        raise ConversionError(
            f"{class_name}: the saved files hold {saved_numel} values but the params have "
            f"{report['param_count']}"
        )
    if not report["reload_exact"]:
        raise ConversionError(f"{class_name}: the written files do not reload to the saved params")
    return report


# ----------------------------------------------------------------------------- whole source


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    variant: str | None = None,
    allow_pickle: bool = False,
    parity: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    **hub_kwargs,
) -> dict[str, Any]:
    """Converts ``src`` (pipeline folder, component folder or Hub repo id) into ``out``.

    Returns the report (also written to ``out/conversion_report.{json,md}``).

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
        ConversionError: unknown layout, classes, or an output folder overlapping the source.
        jaxdiff.loaders.state_dict.WeightLoadError: weights that do not match their config.
        jaxdiff.hub.HubFileNotFoundError: missing folders, files or Hub repos.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    src_name = os.fspath(src)
    local = _local_source(src_name, variant, allow_pickle, **hub_kwargs)
    out = Path(out)
    index_path = local / MODEL_INDEX
    if index_path.is_file():
        layout = "pipeline"
        index = json.loads(index_path.read_text())
    elif (local / "config.json").is_file():
        layout = "component"
        index = None
    else:
        raise ConversionError(
            f"{src_name} is neither a diffusers pipeline folder (no {MODEL_INDEX}) nor a model "
            f"folder (no config.json); it holds {sorted(os.listdir(local))}"
        )
    _prepare_out(out, [local], overwrite)

    report: dict[str, Any] = {
        "source": src_name,
        "source_folder": str(local),
        "layout": layout,
        "pipeline_class": index.get("_class_name") if index else None,
        "saved_dtype": dtype,
        "variant": variant,
        "allow_pickle": allow_pickle,
        "parity_checked": bool(parity and parity_adapters.reference_available()),
        "components": {},
    }
    kw = dict(dtype=dtype, variant=variant, allow_pickle=allow_pickle, parity=parity, seed=seed)
    if layout == "component":
        name = local.name
        report["components"][name] = convert_model(local, None, out, _component_class(local), **kw)
    else:
        new_index = dict(index)
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
                continue
            library, class_name = entry
            folder = local / name
            if class_name is None:
                continue
            if not folder.is_dir():
                raise hub.HubFileNotFoundError(
                    f"{MODEL_INDEX} of {src_name} lists component {name!r} ({class_name}) but "
                    f"there is no folder {folder}"
                )
            if _is_model_class(class_name):
                report["components"][name] = convert_model(
                    local, name, out / name, class_name, **kw
                )
            elif any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()):
                new_index[name] = [None, None]
                report["components"][name] = {
                    "class": class_name,
                    "action": "skipped",
                    "reason": f"jaxdiff has no model class {class_name!r}; set to [null, null] "
                    f"in {MODEL_INDEX}",
                }
            else:
                report["components"][name] = _copy_component(
                    folder, out / name, library, class_name
                )
        (out / MODEL_INDEX).write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")

    report["versions"] = _versions()
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(report_markdown(report))
    return report


def _copy_component(folder: Path, out: Path, library: str, class_name: str) -> dict[str, Any]:
    """Copies a non-model component (checking schedulers load in jaxdiff first)."""
    entry: dict[str, Any] = {"class": class_name, "library": library, "action": "copied"}
    if class_name in COMPONENT_CLASSES:
        cls = import_class(class_name, COMPONENT_CLASSES, "component class")
        cls.from_pretrained(folder)  # raises on a config jaxdiff cannot use
        entry["jaxdiff_class"] = COMPONENT_CLASSES[class_name]
    elif class_name.endswith("Scheduler"):
        entry["note"] = f"jaxdiff has no scheduler {class_name!r}: copied as is"
    shutil.copytree(folder, out, symlinks=False)
    entry["files"] = sorted(p.name for p in out.iterdir())
    return entry


def _versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "flax", "jaxdiff"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    for name in parity_adapters.TORCH_LIBRARIES:
        mod = sys.modules.get(name)  # only report what the parity check actually imported
        if mod is not None:
            out[name] = mod.__version__
    return out


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page (one table row per component)."""
    lines = [
        f"# Conversion report: {report['source']}",
        "",
        f"Layout: {report['layout']}"
        + (f" ({report['pipeline_class']})" if report.get("pipeline_class") else "")
        + f"; saved dtype: {report['saved_dtype']}; variant read: {report['variant']}; "
        f"parity checked: {report['parity_checked']}.",
        "",
        "| component | class | params | stored dtype(s) | saved dtype | reload exact | "
        "parity (rel. L2 vs PyTorch, fp32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in report["components"].items():
        if "param_count" not in c:
            lines.append(f"| {name} | {c['class']} | - | - | - | - | {c['action']} |")
            continue
        stored = ", ".join(f"{k} x{v}" for k, v in sorted(c["stored_dtypes"].items()))
        if c.get("parity"):
            par = ", ".join(f"{k} {v:.2e}" for k, v in c["parity"].items())
        else:
            par = f"skipped ({c.get('parity_skipped')})"
        lines.append(
            f"| {name} | {c['class']} | {c['param_count']:,} | {stored} | {c['saved_dtype']} | "
            f"{c['reload_exact']} | {par} |"
        )
    lines += ["", f"Versions: {json.dumps(report['versions'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="Hub repo id, pipeline folder or component folder")
    parser.add_argument("--out", required=True, help="output folder (must be empty)")
    parser.add_argument("--dtype", default="float32", choices=sorted(STORAGE_DTYPES))
    parser.add_argument("--variant", default=None, help="source weight variant, e.g. fp16")
    parser.add_argument("--allow-pickle", action="store_true", help="also read .bin checkpoints")
    parser.add_argument("--no-parity", action="store_true", help="skip the PyTorch parity check")
    parser.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    parser.add_argument("--revision", default=None, help="Hub revision")
    args = parser.parse_args(argv)
    hub_kwargs = {"revision": args.revision} if args.revision else {}
    report = convert(
        args.src,
        args.out,
        dtype=args.dtype,
        variant=args.variant,
        allow_pickle=args.allow_pickle,
        parity=not args.no_parity,
        overwrite=args.overwrite,
        **hub_kwargs,
    )
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
