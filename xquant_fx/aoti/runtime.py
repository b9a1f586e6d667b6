"""Runtime: :func:`load` opens a package and :class:`ExportedLM` generates from it, without the
model, transformers or the capture code."""

from __future__ import annotations

import inspect
import time

import torch

from ..config import XQuantConfig
from .cxx_runtime import check_cxx_runtime
from .package import (DECODE, PREFILL, _DTYPES, PackageError, _check_archive_path, _resolve_config, _token_ids,
                      config_from_dict, config_to_dict, read_metadata, verify_package)


#: Default of ``ExportedLM.generate(eos_token_id=...)``: the model's eos ids recorded at export.
_FROM_PACKAGE = object()


def load(
    path,
    *,
    config: XQuantConfig | str | None = None,
    max_cache_len: int | None = None,
    batch_size: int | None = None,
    device=None,
    verify: bool = True,
    runtime_check: bool = True,
) -> "ExportedLM":
    """Open a package written by :func:`export`.

    ``config``, ``max_cache_len``, ``batch_size`` and ``device`` are optional expectations: when
    given and the package was exported otherwise, :class:`PackageError` says what differs (a
    package's shapes are fixed at export). ``device`` may name a CUDA device index (``"cuda:1"``).

    Trust: a ``.pt2`` package contains native code (the compiled ``.so`` of each program), which
    runs with your process's rights as soon as it is loaded. Load only packages you would run as a
    program: ones you exported yourself or got from someone you trust, over a channel you trust.
    Integrity: with ``verify=True`` (default) every member is read and checked against the SHA-256
    manifest that :func:`export` wrote into the package (and its zip CRC-32) *before* any native
    code is loaded; a damaged package raises :class:`PackageError` (a ``ValueError``) naming the
    bad member (:func:`verify_package`). These checksums detect corruption (a bad disk or copy, a
    truncated download), not malice: whoever can change the package can rewrite its manifest too.
    A package written before packages carried a manifest is refused with the way out: export it
    again, or pass ``verify=False`` if you trust the file (that skips every checksum; reading the
    members costs 1-2 s per GB on one core).

    CUDA packages and the C++ runtime (``runtime_check=True``, CUDA only; CPU loading is
    unchanged): a package's ``.so`` binds the C++ runtime symbols it imports (``std::regex``,
    locales, streams) in this process. Where another library of the process exports its own copy
    of those symbols ahead of ``libstdc++``, or the ``libstdc++`` this process has mapped is older
    than the package needs, torch's loader crashes with a segmentation fault inside the package's
    code (seen with torch 2.11 on the H200 machine's image), which no Python code can catch. So
    before loading, :func:`load` reads the package's imported C++ symbols and their versions from
    its ``.so`` (ELF tables; nothing is executed), asks the dynamic linker which library each
    would bind to, and compares versions with the ``libstdc++`` this process mapped; that takes
    milliseconds. On a clash it raises :class:`PackageError` naming the library and the fix, to
    start Python with the compiler's C++ runtime first:
    ``LD_PRELOAD=$(readlink -f $(g++ -print-file-name=libstdc++.so.6)) python ...``. Only when
    that inspection is impossible (no ``/proc/self/maps``, no ``dlsym``/``dladdr``, an ``.so``
    it cannot parse, or one that imports no versioned ``libstdc++`` symbols) does it load the
    package once in a child process first, where a crash is reported instead of inherited; that
    costs about one more load (tens of seconds on CUDA), so a passed trial is remembered (in
    ``~/.cache/xquant_fx``, or ``$XQUANT_FX_CACHE_DIR``) per package code and process runtime, and
    the next load of the same package skips it. ``runtime_check=False`` skips all of it. Why not
    always the child process: it costs a second full load (weights included), for a clash the
    symbol tables already show. Not yet verified on the H200 image itself (tested on CPU
    with simulated clashes; ``benchmarks/check_export_cuda.py`` checks it there): on that image,
    use the ``LD_PRELOAD`` line regardless.
    """
    path = _check_archive_path(path)
    if verify:
        verify_package(path)
    meta = read_metadata(path)
    problems = []
    if config is not None:
        want = config_to_dict(_resolve_config(config))
        have = meta["config"]
        diffs = [f"{k}={have.get(k)!r} (requested {v!r})" for k, v in want.items() if k != "name" and have.get(k) != v]
        if diffs:
            problems.append(f"config {have.get('name')!r} differs from the requested {want['name']!r}: "
                            + ", ".join(diffs))
    if max_cache_len is not None and max_cache_len != meta["max_cache_len"]:
        problems.append(f"max_cache_len={meta['max_cache_len']} (requested {max_cache_len})")
    if batch_size is not None and batch_size != meta["batch_size"]:
        problems.append(f"batch_size={meta['batch_size']} (requested {batch_size})")
    want_device = torch.device(device) if device is not None else torch.device(meta["device"])
    if want_device.type != meta["device"]:
        problems.append(f"device {meta['device']} (requested {want_device.type})")
    if problems:
        raise PackageError(f"{path} was exported with " + "; ".join(problems) + ": re-export it with those settings")
    if meta["device"] == "cuda" and not torch.cuda.is_available():
        raise PackageError(f"{path} is a CUDA package and this machine has no usable CUDA device")
    if meta["device"] == "cuda" and runtime_check:
        check_cxx_runtime(path, meta)
    if meta.get("runtime_ops"):
        from .. import ops  # noqa: F401

        missing = [op for op in meta["runtime_ops"] if not hasattr(torch.ops.xquant, op.split("::")[1])]
        if missing:
            raise PackageError(f"{path} calls {missing}, which this xquant_fx does not register: re-export it")
    return ExportedLM(path, meta, want_device)


class ExportedLM:
    """A package loaded for generation: the decode (and prefill) programs sharing one cache.

    Attributes: ``metadata`` (what :func:`export` recorded), ``batch_size``, ``max_cache_len``,
    ``max_prompt_len`` (0: no prefill program), ``device``, ``state`` (the cache tensors,
    ``"layer.name" -> tensor``), ``last_timing`` (seconds of the last :meth:`generate`: ``prefill_s``,
    ``decode_s``, ``decode_steps``).
    """

    def __init__(self, path, meta: dict, device: torch.device):
        from torch.export.pt2_archive._package import load_pt2

        self.path = str(path)
        self.metadata = meta
        self.batch_size = meta["batch_size"]
        self.max_cache_len = meta["max_cache_len"]
        self.max_prompt_len = meta["max_prompt_len"]
        self.vocab_size = meta["vocab_size"]
        #: Token ids the programs accept: ``0 .. input_vocab_size - 1`` (rows of the input embedding).
        self.input_vocab_size = meta.get("input_vocab_size", self.vocab_size)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        accepts = set(inspect.signature(load_pt2).parameters)
        kwargs = {}
        if device.type == "cuda" and "device_index" in accepts:
            kwargs["device_index"] = device.index
        if meta.get("weights") == "on_disk":
            if "load_weights_from_disk" not in accepts:
                raise PackageError(f"{self.path} keeps its weights beside the models, which this torch "
                                   f"({torch.__version__}) cannot load; re-export it with this torch")
            kwargs["load_weights_from_disk"] = True
        try:
            contents = load_pt2(self.path, **kwargs)
        except Exception as err:
            raise PackageError(f"AOTInductor could not load {self.path}: {err}") from err
        self._runners = contents.aoti_runners
        wanted = set(meta["constants"])
        if set(self._runners) != wanted:
            raise PackageError(f"{self.path} holds models {sorted(self._runners)}, its metadata names {sorted(wanted)}")
        self.state = {
            key: torch.zeros(spec["shape"], dtype=_DTYPES[spec["dtype"]], device=device)
            for key, spec in meta["state"].items()
        }
        for name, fqns in meta["constants"].items():
            runner = self._runners[name]
            known = set(runner.get_constant_fqns())
            absent = sorted(set(fqns) - known)
            if absent:
                raise PackageError(f"model {name!r} of {self.path} lacks the cache constants {absent[:4]}")
            runner.load_constants({fqn: self.state[key] for fqn, key in fqns.items()},
                                  check_full_update=False, user_managed=True)
        # Position inputs, sliced rather than built per step (no host-to-device copy on CUDA).
        self._positions = torch.arange(self.max_cache_len + 1, dtype=torch.long, device=device)
        self._position = 0
        self.last_timing: dict = {}

    @property
    def config(self) -> XQuantConfig:
        """The :class:`XQuantConfig` the package's cache was exported with."""
        return config_from_dict(self.metadata["config"])

    def __repr__(self) -> str:
        m = self.metadata
        return (f"ExportedLM({self.path!r}: {m['model_class']}, {m['config']['name']}, {m['device']} {m['dtype']}, "
                f"batch {self.batch_size}, max_cache_len {self.max_cache_len}, "
                f"programs {sorted(self._runners)}, {self.position} tokens stored)")

    # ------------------------------------------------------------------ programs
    def _run(self, name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
        runner = self._runners[name]
        loader = getattr(runner, "loader", None)
        out = loader.boxed_run(inputs) if loader is not None else runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out

    def _check_ids(self, ids, what: str) -> torch.Tensor:
        if not torch.is_tensor(ids) or ids.dim() != 2:
            shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"{what} must be token ids of shape [batch, length], got {shape}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must be integer token ids, got {ids.dtype}")
        if ids.shape[0] != self.batch_size:
            raise ValueError(
                f"{what} has batch {ids.shape[0]} but the package was exported for batch {self.batch_size} "
                "(shapes are fixed at export)"
            )
        if ids.numel():
            # the compiled programs index the embedding without bounds checks: refuse here, before they run
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.input_vocab_size:
                bad = low if low < 0 else high
                where = tuple(int(i) for i in (ids == bad).nonzero()[0])
                raise ValueError(f"{what} holds token id {bad} at {list(where)}, outside the model's vocabulary "
                                 f"of {self.input_vocab_size} ids (0..{self.input_vocab_size - 1})")
        return ids.to(device=self.device, dtype=torch.long).contiguous()

    def reset(self) -> None:
        """Forget every stored token (zero the cache)."""
        for t in self.state.values():
            t.zero_()
        self._position = 0

    @property
    def position(self) -> int:
        """Tokens stored per sequence."""
        return self._position

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with the prompt ``input_ids [B, L]``; returns the logits ``[B, V]``
        of its last token. Up to ``max_prompt_len`` tokens go through the prefill program at once,
        the rest (or all, without a prefill program) through the decode program one at a time."""
        return self._prefill(self._check_ids(input_ids, "input_ids"))

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length < 1:
            raise ValueError("the prompt is empty")
        if length > self.max_cache_len:
            raise ValueError(f"a prompt of {length} tokens does not fit max_cache_len={self.max_cache_len}")
        self.reset()
        done = 0
        logits = None
        if self.max_prompt_len:
            done = min(length, self.max_prompt_len)
            padded = ids.new_zeros(self.batch_size, self.max_prompt_len)
            padded[:, :done] = ids[:, :done]
            logits = self._run(PREFILL, [padded, self._positions[done : done + 1]])
            self._position = done
        for i in range(done, length):
            logits = self._step(ids[:, i : i + 1])
        return logits

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Store one token per sequence (``[B]`` or ``[B, 1]``) at the next position; returns its
        logits ``[B, V]``."""
        if torch.is_tensor(token_ids) and token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        ids = self._check_ids(token_ids, "token_ids")
        if ids.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got {ids.shape[1]}")
        return self._step(ids)

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`step` on checked ids ``[B, 1]`` (generate's own tokens: argmax of the logits)."""
        p = self._position
        if p >= self.max_cache_len:
            raise ValueError(f"the cache is full: {p} tokens stored, max_cache_len={self.max_cache_len}")
        # contiguous: the compiled program assumes the example's strides (a column slice of a prompt is not)
        logits = self._run(DECODE, [ids.contiguous(), self._positions[p : p + 1]])
        self._position = p + 1
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        eos_token_id=_FROM_PACKAGE,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy generation: the prompt ``[B, L]`` followed by up to ``max_new_tokens`` tokens.

        Like transformers' greedy ``generate``: generation stops when every sequence has produced
        an eos token, and a finished sequence continues with ``pad_token_id``. ``eos_token_id``
        (an int or a list) defaults to the model's, recorded at export; ``None`` never stops early.
        """
        ids = self._check_ids(input_ids, "input_ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        needed = ids.shape[1] + max_new_tokens - 1  # the last new token is returned, never stored
        if needed > self.max_cache_len:
            raise ValueError(
                f"a {ids.shape[1]}-token prompt and {max_new_tokens} new tokens need {needed} cache positions; "
                f"the package was exported with max_cache_len={self.max_cache_len}"
            )
        eos = self.metadata["eos_token_id"] if eos_token_id is _FROM_PACKAGE else _token_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.metadata.get("pad_token_id")
        if eos and pad is None:
            pad = eos[0]
        if eos and not 0 <= pad < self.input_vocab_size:
            raise ValueError(f"pad_token_id {pad} is outside the model's vocabulary of {self.input_vocab_size} ids")
        eos_t = torch.tensor(eos, device=self.device) if eos else None
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        sync()
        start = time.perf_counter()
        logits = self._prefill(ids)
        token = logits.argmax(-1)
        sync()
        prefill_s = time.perf_counter() - start
        out = [token]
        unfinished = None
        if eos_t is not None:
            unfinished = ~torch.isin(token, eos_t)
        start = time.perf_counter()
        steps = 0
        for _ in range(max_new_tokens - 1):
            if unfinished is not None and not bool(unfinished.any()):
                break
            token = self._step(token[:, None]).argmax(-1)
            steps += 1
            if unfinished is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                unfinished &= ~torch.isin(token, eos_t)
            out.append(token)
        sync()
        self.last_timing = {"prefill_s": prefill_s, "decode_s": time.perf_counter() - start, "decode_steps": steps}
        return torch.cat([ids, torch.stack(out, 1)], 1)
