r"""Textual inversion: new tokens with learned embeddings (*Gal et al. (2022), "An Image is
Worth One Word", Eq. 2*: :math:`v_* = \arg\min_v \mathbb{E}\,\lVert \epsilon - \epsilon_\theta(z_t,
t, c_\theta(y; v)) \rVert^2`, the text encoder and UNet frozen).

``pipe.load_textual_inversion(path, token="<cat-toy>")`` adds the token to the tokenizer and its
vector :math:`v_*` as a new row of the text encoder's token embedding, as diffusers'
``TextualInversionLoaderMixin``. Files: diffusers' ``learned_embeds.safetensors``
(``{token: vector}``), Automatic1111 ``.safetensors`` (``{"emb_params": (n, d)}``, pass
``token=``) and, with ``allow_pickle=True``, ``.pt``/``.bin`` (``string_to_param``). An
embedding of ``n > 1`` vectors becomes the tokens ``token, token_1, ..., token_{n-1}``, and
prompts are rewritten to spell them all (``maybe_convert_prompt``).

The embedding grows by the new rows, so the text encoder is a new module (one recompile);
``unload_textual_inversion`` restores the tokenizer and embedding without the removed tokens.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff import hub
from jaxdiff.loaders.safetensors_io import load_file
from jaxdiff.loaders.weights import read_state_dict

TEXT_INVERSION_NAME_SAFE = "learned_embeds.safetensors"
TEXT_INVERSION_NAME = "learned_embeds.bin"
_EMBEDDING = ("text_model", "embeddings", "token_embedding", "embedding")


def read_textual_inversion(
    source: str | os.PathLike | Mapping[str, Any] | np.ndarray,
    weight_name: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    **hub_kwargs,
) -> Any:
    """The state dict (or bare array) of one textual-inversion file, folder, repo or dict."""
    if isinstance(source, Mapping) or hasattr(source, "__array__"):
        return source
    name = os.fspath(source)
    if os.path.isfile(name):
        path = name
    else:
        path = hub.resolve_file(
            name, weight_name or TEXT_INVERSION_NAME_SAFE, subfolder, required=False, **hub_kwargs
        )
        if path is None and allow_pickle:
            path = hub.resolve_file(name, TEXT_INVERSION_NAME, subfolder, **hub_kwargs)
        if path is None:
            raise hub.HubFileNotFoundError(
                f"No textual inversion file in {name!r}: tried "
                f"{weight_name or TEXT_INVERSION_NAME_SAFE!r}"
                + ("" if allow_pickle else f" ({TEXT_INVERSION_NAME!r} needs allow_pickle=True)")
            )
    if path.endswith(".safetensors"):
        return load_file(path)
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled file; pass allow_pickle=True to read it "
            "(torch.load(weights_only=True)), or convert it to safetensors"
        )
    return _torch_load_embedding(path)


def _torch_load_embedding(path: str) -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading the pickled embedding {path} needs torch") from err
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        return data.float().numpy()
    if "string_to_param" in data:  # Automatic1111 .pt
        return {"name": data.get("name"), "string_to_param": {"*": data["string_to_param"]["*"].float().numpy()}}  # fmt: skip
    return read_state_dict([path], allow_pickle=True)


def token_and_embedding(state: Any, token: str | None) -> tuple[str, np.ndarray]:
    """(token, (n, d) vectors) of one loaded state, as diffusers' ``_retrieve_tokens_and_
    embeddings``: a bare array needs ``token``; a one-key dict names its token (``token``
    overrides it); an Automatic1111 ``string_to_param`` dict has ``name``."""
    if isinstance(state, Mapping) and "string_to_param" in state:
        loaded, emb = state.get("name"), state["string_to_param"]["*"]
    elif isinstance(state, Mapping):
        if len(state) != 1:
            raise ValueError(
                f"a textual inversion state dict must hold one embedding, got keys {sorted(state)}"
            )
        loaded, emb = next(iter(state.items()))
    else:
        if token is None:
            raise ValueError("the embedding is a bare array: pass token=... to name it")
        loaded, emb = token, state
    emb = np.asarray(emb, np.float32)
    return (token if token is not None else loaded), emb.reshape(-1, emb.shape[-1])


class TextualInversionLoaderMixin:
    """``load_textual_inversion`` / ``unload_textual_inversion`` / ``maybe_convert_prompt``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tokenizer", "text_encoder") and "_ti" in self.__dict__:
            self.__dict__["_ti"].update(base=None, tokens=[])  # a new model: nothing loaded
        super().__setattr__(name, value)

    def _adopt_state(self, source: Any, kept: list[str]) -> None:
        """``from_pipe``: the loaded tokens carry over when the tokenizer and text encoder
        they live in are kept."""
        super()._adopt_state(source, kept)
        if "_ti" in source.__dict__ and {"tokenizer", "text_encoder"} <= set(kept):
            old = source._ti_state()
            self._ti_state().update(base=old["base"], tokens=list(old["tokens"]))

    def _ti_state(self) -> dict[str, Any]:
        if "_ti" not in self.__dict__:
            object.__setattr__(self, "_ti", {"base": None, "tokens": []})
        return self.__dict__["_ti"]

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: Any,
        token: str | Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        """Adds textual-inversion tokens to the tokenizer and text encoder.

        Args:
            pretrained_model_name_or_path: a file, a folder or Hub repo (``weight_name``,
                default ``learned_embeds.safetensors``), a state dict or an array; or a list.
            token: the token (or one per source); default: the name stored in the file.
            **kwargs: ``weight_name``, ``subfolder``, ``allow_pickle`` and the Hub options.

        Raises:
            ValueError: a token that the tokenizer already has, tokens that repeat, a list of
                tokens whose length does not match, or vectors of the wrong width.
        """
        hub_kwargs = hub.pop_hub_kwargs(kwargs)
        file_kwargs = {
            k: kwargs.pop(k) for k in ("weight_name", "subfolder", "allow_pickle") if k in kwargs
        }
        if kwargs:
            raise TypeError(f"load_textual_inversion got unexpected argument(s) {sorted(kwargs)}")
        sources = (
            list(pretrained_model_name_or_path)
            if isinstance(pretrained_model_name_or_path, list)
            else [pretrained_model_name_or_path]
        )
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources):
            if len(sources) == 1 and np.ndim(sources[0]) == 2:  # one array, a token per row
                sources = list(np.asarray(sources[0]))
            if len(tokens) != len(sources):
                raise ValueError(
                    f"got {len(sources)} embedding(s) and {len(tokens)} token(s): give one token "
                    "per embedding"
                )
        named = [t for t in tokens if t is not None]
        if len(set(named)) < len(named):
            raise ValueError(f"token holds duplicates: {tokens}")
        vocab = self.tokenizer.get_vocab()
        width = self.text_encoder.config.hidden_size
        new: list[tuple[str, np.ndarray]] = []
        for source, tok in zip(sources, tokens, strict=True):
            tok, vectors = token_and_embedding(read_textual_inversion(source, **file_kwargs, **hub_kwargs), tok)  # fmt: skip
            names = [tok] + [f"{tok}_{i}" for i in range(1, len(vectors))]
            taken = [n for n in names if n in vocab or n in dict(new)]
            if taken or f"{tok}_1" in vocab:
                raise ValueError(
                    f"token {tok!r} is already in the tokenizer ({taken or [f'{tok}_1']}): pick "
                    "another token, or unload_textual_inversion() first"
                )
            if vectors.shape[-1] != width:
                raise ValueError(
                    f"the embedding of {tok!r} has width {vectors.shape[-1]}, but the text "
                    f"encoder's token embedding is {width} wide"
                )
            new += list(zip(names, vectors, strict=True))
        state = self._ti_state()
        if state["base"] is None:
            table = np.asarray(_get(self.params["text_encoder"], _EMBEDDING))
            state["base"] = (copy.deepcopy(self.tokenizer), self.text_encoder.config, table)
        self._set_textual_inversion(state["tokens"] + new)

    def unload_textual_inversion(self, tokens: str | Sequence[str] | None = None) -> None:
        """Removes ``tokens`` (with their ``_i`` vectors; default: all loaded ones)."""
        state = self._ti_state()
        if tokens is None:
            keep = []
        else:
            tokens = [tokens] if isinstance(tokens, str) else list(tokens)
            loaded = [t for t, _ in state["tokens"]]
            missing = [t for t in tokens if t not in loaded]
            if missing:
                raise ValueError(f"tokens {missing} are not loaded; loaded: {loaded}")
            keep = [(t, v) for t, v in state["tokens"] if t not in tokens]
        if state["base"] is not None:
            self._set_textual_inversion(keep)

    def _set_textual_inversion(self, pairs: list[tuple[str, np.ndarray]]) -> None:
        """Rebuilds the tokenizer and text encoder: the originals plus ``pairs``, in order."""
        state = self._ti_state()
        base_tokenizer, base_config, table = state["base"]
        tokenizer = copy.deepcopy(base_tokenizer)
        rows = len(tokenizer) + len(pairs)  # as diffusers: resize_token_embeddings(len(tok) + n)
        grown = np.zeros((rows, table.shape[1]), np.float32)
        grown[: min(rows, table.shape[0])] = table[:rows]
        for name, vector in pairs:
            tokenizer.add_tokens(name)
            grown[tokenizer.convert_tokens_to_ids(name)] = vector
        current = self.text_encoder  # its dtype may have changed (pipe.to) since the first load
        module = type(current).from_config({**base_config, "vocab_size": rows}, dtype=current.dtype)
        old = self.params["text_encoder"]  # LoRA never adapts the embedding: keep the rest
        dtype = _get(old, _EMBEDDING).dtype
        params = _set(old, _EMBEDDING, jnp.asarray(grown, dtype))
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "text_encoder", module)
        self.params["text_encoder"] = params
        self._jit_cache.clear()
        state["tokens"] = pairs
        if not pairs:
            state["base"] = None

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer: Any = None):
        """Spells out multi-vector tokens: ``"<s>"`` -> ``"<s> <s>_1 <s>_2"``."""
        tokenizer = tokenizer or self.tokenizer
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        added = getattr(tokenizer, "added_tokens_encoder", {})
        out = []
        for p in prompts:
            for tok in set(tokenizer.tokenize(p)):
                if tok in added:
                    replacement, i = tok, 1
                    while f"{tok}_{i}" in added:
                        replacement += f" {tok}_{i}"
                        i += 1
                    p = p.replace(tok, replacement)
            out.append(p)
        return out[0] if isinstance(prompt, str) else out


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
    """A copy of ``tree`` with ``path`` replaced (the other leaves shared)."""
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}
