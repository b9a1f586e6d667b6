"""The decode simulator: one parallel forward per candidate config gives the decode-condition
logits of the real cache (why and how: :mod:`xquant_fx.config_search`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

from .. import quant
from ..config import FULL_PRECISION, LayerPlan, XQuantConfig
from ..hf import kv_geometry, layer_types, text_config

_ATTN_NAME = "xquant_search"
_ACTIVE: list["DecodeSimulator"] = []  # the simulator whose forward is running


def _attention_entry(module, query, key, value, attention_mask, **kwargs):
    if not _ACTIVE:
        raise RuntimeError(f"the {_ATTN_NAME!r} attention only runs inside a DecodeSimulator pass")
    return _ACTIVE[-1].attend(module, query, key, value, **kwargs)


def _decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    num_layers = kv_geometry(model.config)[0]
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != num_layers:
        raise ValueError(
            f"{type(model).__name__}: cannot find its {num_layers} decoder layers as `get_decoder().layers`; "
            "the search supports transformers decoder-only models built that way (Llama, Mistral, Qwen, ...)"
        )
    return layers


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer whose output is already known: returns it without computing."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@dataclass(frozen=True)
class Score:
    """Decode-condition quality of one cache plan on the calibration text: ``kl`` is the mean
    KL(full precision || plan) of the next-token distributions in nats per token, ``nll`` the
    mean negative log-likelihood of the text (``ppl = exp(nll)``)."""

    kl: float
    nll: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class QualityOptions:
    """The config fields besides the per-layer plan and eta that change what the cache reads back:
    ``sink_tokens``, ``rotation``, ``level_fit``, ``metadata_dtype`` and ``value_group_size``
    (:class:`XQuantConfig`)."""

    sink_tokens: int = 0
    rotation: str | None = None
    level_fit: str = "minmax"
    metadata_dtype: str | None = None
    value_group_size: int | None = None

    def __post_init__(self):
        # validated as XQuantConfig validates them (sinks against the window: DecodeSimulator.check_options)
        checked = XQuantConfig(residual_length=1 << 30, group_size=32, **self._fields())
        object.__setattr__(self, "metadata_dtype", checked.metadata_dtype)  # a torch dtype -> its name

    def _fields(self) -> dict:
        return dict(sink_tokens=self.sink_tokens, rotation=self.rotation, level_fit=self.level_fit,
                    metadata_dtype=self.metadata_dtype, value_group_size=self.value_group_size)

    @classmethod
    def of(cls, config: XQuantConfig) -> "QualityOptions":
        return cls(config.sink_tokens, config.rotation, config.level_fit, config.metadata_dtype,
                   config.value_group_size)

    def apply(self, config: XQuantConfig) -> XQuantConfig:
        """``config`` with these options (eta cleared for ``level_fit="lsq"``, which replaces it)."""
        eta = {} if self.level_fit == "lsq" else config.eta
        return config.replace(eta=eta, **self._fields())

    @property
    def label(self) -> str:
        """Short text, e.g. ``sinks=4, hadamard, lsq, fp8 metadata`` (``none``: all off)."""
        parts = []
        if self.sink_tokens:
            parts.append(f"sinks={self.sink_tokens}")
        if self.rotation:
            parts.append(self.rotation)
        if self.level_fit != "minmax":
            parts.append(self.level_fit)
        if self.metadata_dtype:
            parts.append({"float8_e4m3fn": "fp8"}.get(self.metadata_dtype, self.metadata_dtype) + " metadata")
        if self.value_group_size:
            parts.append(f"value groups of {self.value_group_size}")
        return ", ".join(parts) or "none"


class DecodeSimulator:
    """Decode-condition scores of cache plans on fixed text, one parallel forward per plan.

    Args:
        model: a transformers decoder-only causal LM (left unchanged: its attention implementation
            is switched only for the duration of each pass).
        ids: token ids ``[segments, length]``; each row is scored like one sequence of
            ``evaluate.decode_nll``: ``prefill`` tokens prefilled, every later token decoded.
        prefill: at most ``residual_length`` (default: ``residual_length``).
        group_size, residual_length: G and R of the configs it will score.

    ``run(plans, eta, options=...)`` scores one per-layer plan (any plan, including sharing
    patterns a config cannot express) under :class:`QualityOptions` (sink tokens, rotation, level
    fit, metadata dtype; default: all off and the simulator's ``metadata_dtype``) and returns a
    :class:`Score`; the module docstring says how and why it equals the cache's decode.
    ``score(config)`` is ``run`` on the config's plan, eta and options.
    """

    def __init__(self, model, ids: torch.Tensor, prefill: int | None = None, group_size: int = 32,
                 residual_length: int = 128, metadata_dtype: str | None = None):
        if ids.dim() != 2:
            raise ValueError(f"ids must be [segments, tokens], got shape {tuple(ids.shape)}")
        from transformers import AttentionInterface

        AttentionInterface.register(_ATTN_NAME, _attention_entry)
        self.model = model
        self.layers = _decoder_layers(model)
        self.num_layers = len(self.layers)
        self.G, self.R = group_size, residual_length
        self.metadata_dtype = XQuantConfig(metadata_dtype=metadata_dtype).metadata_dtype  # validated
        self.head_dims = kv_geometry(model.config)[2:]
        segments, length = ids.shape
        prefill = residual_length if prefill is None else prefill
        if not 1 <= prefill <= min(residual_length, length - 1):
            raise ValueError(f"prefill={prefill} must be in [1, min(residual_length={residual_length}, "
                             f"segment length - 1 = {length - 1})]")
        if length <= residual_length + 1:
            raise ValueError(
                f"segments of {length} tokens never leave the {residual_length}-token full-precision window: "
                "nothing would be quantized; use longer segments"
            )
        self.ids = ids.to(model.device)
        self.P = prefill
        _, sliding = _num_layers_and_sliding(model, length)
        if any(sliding):
            raise ValueError(f"{type(model).__name__} has sliding-window layers ({sum(sliding)} of {self.num_layers}): "
                             "the decode simulator (and the search) support full-attention models only")
        self.forwards = 0
        self._plans: list[LayerPlan] = []
        self._eta: dict[int, float] = {}
        self._options = self.default_options  # those of the pass running
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._recorded: dict | None = None
        # Reference pass, full precision over the whole text: keeps the keys and values of the first
        # P - 1 positions (no plan changes them) and the reference next-token distributions.
        logits = self._forward(self.full_precision_plans(), {}, self.ids[:, :-1], 0, None, False, prefix=True)
        self.ref_logp = torch.log_softmax(logits[:, self.P - 1 :].float(), -1)  # [S, n, V]
        self.ref_p = self.ref_logp.exp()
        self.targets = self.ids[:, self.P :]
        self.reference = replace(self._score(logits[:, self.P - 1 :]), kl=0.0)

    @property
    def scored_tokens(self) -> int:
        return self.targets.numel()

    def full_precision_plans(self) -> list[LayerPlan]:
        return [LayerPlan(i, FULL_PRECISION, FULL_PRECISION) for i in range(self.num_layers)]

    @property
    def default_options(self) -> QualityOptions:
        """What ``run`` applies when given no options: all off, the simulator's metadata dtype."""
        return QualityOptions(metadata_dtype=self.metadata_dtype)

    @property
    def rotation_fits(self) -> bool:
        """Whether ``rotation="hadamard"`` applies to this model (power-of-two head dims)."""
        return all(d > 0 and d & (d - 1) == 0 for d in self.head_dims)

    def check_options(self, options: QualityOptions, eta: dict[int, float] | None = None) -> None:
        """Raise ``ValueError`` if the cache would refuse ``options`` (with ``eta``) on this model."""
        if not 0 <= options.sink_tokens < self.R:
            raise ValueError(f"sink_tokens={options.sink_tokens}: must be in [0, residual_length={self.R})")
        if options.rotation is not None and not self.rotation_fits:
            raise ValueError(f"rotation={options.rotation!r} needs power-of-two head dims; this model's key/value "
                             f"head dims are {self.head_dims}")
        if eta and options.level_fit == "lsq" and any(eta.values()):
            raise ValueError(f"level_fit='lsq' replaces eta calibration; got eta={eta!r}")

    def plans(self, config: XQuantConfig) -> list[LayerPlan]:
        """The per-layer plan of ``config`` on this model, as the cache resolves it."""
        if (config.group_size, config.residual_length) != (self.G, self.R):
            raise ValueError(f"config {config.name!r} has group_size={config.group_size}, residual_length="
                             f"{config.residual_length}; this simulator was built for {self.G} and {self.R}")
        return config.resolve(self.num_layers)

    def score(self, config: XQuantConfig) -> Score:
        """Decode-condition score of ``config``: its plan, eta and quality options (any metadata dtype)."""
        plans = self.plans(config)
        if all(p.k_bits == FULL_PRECISION and p.v_bits == FULL_PRECISION for p in plans):
            return self.reference  # the reference pass is this plan
        return self.run(plans, config.eta, options=QualityOptions.of(config))

    def run(self, plans: list[LayerPlan], eta: dict[int, float], start: int = 0, record: bool = False,
            options: QualityOptions | None = None) -> Score:
        """Score ``plans`` (one :class:`LayerPlan` per layer) with calibration ``eta`` under
        ``options`` (default :attr:`default_options`), exactly as a cache of those settings decodes.

        ``record=True`` keeps this pass's layer outputs; ``start=l`` then reuses that recorded pass
        for layers ``< l``, whose plans, eta and options must be the recorded pass's (checked)."""
        if len(plans) != self.num_layers:
            raise ValueError(f"{len(plans)} plans for a model with {self.num_layers} layers")
        options = self.default_options if options is None else options
        self.check_options(options, eta)
        recorded = None
        if start:
            recorded = self._recorded
            if recorded is None:
                raise RuntimeError("run(start > 0) needs a recorded pass first (record=True)")
            if plans[:start] != recorded["plans"][:start] or eta != recorded["eta"] or options != recorded["options"]:
                raise ValueError(f"run(start={start}): the plans below layer {start}, eta or the options differ from "
                                 "the recorded pass")
        self._options = options
        try:
            logits = self._forward(plans, eta, self.ids[:, self.P - 1 : -1], start, recorded, record)
        finally:
            self._options = self.default_options
        return self._score(logits)

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def _attention_swapped(self):
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_ATTN_NAME)
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.pop()
            self.model.set_attn_implementation(previous)

    def _forward(self, plans, eta, ids, start, recorded, record, prefix=False):
        """Logits ``[S, n, V]`` of ``ids`` at positions ``P - 1 ...`` (``0 ...`` with ``prefix``)."""
        self._plans, self._eta, self._prefix_pass = plans, dict(eta), prefix
        self._kv = dict(recorded["kv"]) if recorded else {}
        outputs, hooks, saved = {}, [], {}
        if record:
            for i, layer in enumerate(self.layers):
                hooks.append(layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out)))
        for i in range(start):
            saved[i] = self.layers[i]
            self.layers[i] = _Replay(recorded["outputs"][i])
        offset = 0 if prefix else self.P - 1
        s, n = ids.shape
        position_ids = torch.arange(offset, offset + n, device=ids.device)[None].expand(s, n)
        no_mask = torch.zeros(s, 1, n, n, device=ids.device)  # a 4D mask: transformers builds none (unused)
        try:
            with torch.no_grad(), self._attention_swapped():
                out = self.model(input_ids=ids, position_ids=position_ids, attention_mask=no_mask, use_cache=False)
        finally:
            for i, layer in saved.items():
                self.layers[i] = layer
            for h in hooks:
                h.remove()
        self.forwards += 1
        if record:
            for i in range(start):
                outputs[i] = recorded["outputs"][i]
            self._recorded = {"outputs": outputs, "kv": dict(self._kv), "plans": list(plans), "eta": dict(eta),
                              "options": self._options}
        return out.logits

    def _score(self, logits: torch.Tensor) -> Score:
        """KL(reference || softmax(logits)) and NLL of the targets, from logits ``[S, n, V]``."""
        logq = torch.log_softmax(logits.float(), -1)
        kl = torch.linalg.vecdot(self.ref_p, self.ref_logp - logq).mean()
        nll = -logq.gather(-1, self.targets[..., None]).mean()
        return Score(kl=max(kl.item(), 0.0), nll=nll.item())

    # ------------------------------------------------------------------ attention
    def attend(self, module, query, key, value, scaling=None, softcap=None, **kwargs):
        """Attention of ``query`` over the cache as decode leaves it (see the module docstring)."""
        if kwargs.get("s_aux") is not None:
            raise ValueError(f"{type(module).__name__} uses attention sinks: the search does not model them")
        layer = module.layer_idx
        plan = self._plans[layer]
        if self._prefix_pass:
            self._prefix[layer] = (key[:, :, : self.P - 1], value[:, :, : self.P - 1])
            k_all, v_all = key, value
        else:
            pk, pv = self._prefix[layer]
            k_all, v_all = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        self._kv[layer] = (k_all, v_all)
        b, hq, nq, d = query.shape
        hkv, nk = k_all.shape[1], k_all.shape[2]
        rep = hq // hkv
        G, R = self.G, self.R
        n = torch.arange(nk - nq, nk, device=query.device) + 1  # tokens stored when each query attends
        j = torch.arange(nk, device=query.device)
        # GQA: the query heads of one KV head become extra rows, [b, hkv, rep * nq, d]
        q = query.float().reshape(b, hkv, rep * nq, d) * (scaling if scaling is not None else d ** -0.5)
        scores = (q @ k_all.float().transpose(-1, -2)).view(b, hkv, rep, nq, nk)
        if plan.k_bits != FULL_PRECISION:
            kq = self._read_back(layer, plan, k_all, "k")
            coded = kq.shape[2]
            if coded:
                sq = (q @ kq.transpose(-1, -2)).view(b, hkv, rep, nq, coded)
                use_q = j[:coded][None] < quant.key_boundary(n, R, G)[:, None]  # [nq, coded]
                scores[..., :coded] = torch.where(use_q, sq, scores[..., :coded])
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = j[None] < n[:, None]
        weights = torch.softmax(scores.masked_fill_(~visible, float("-inf")), -1)
        out = weights.view(b, hkv, rep * nq, nk) @ v_all.float()
        if plan.v_bits != FULL_PRECISION:
            # values below Nv(n) come from codes: add their weights times (read back - exact)
            delta = self._read_back(layer, plan, v_all, "v") - v_all.float()
            from_codes = j[None] < quant.value_boundary(n, R)[:, None]
            out += (weights * from_codes).view(b, hkv, rep * nq, nk) @ delta
        return out.view(b, hq, nq, -1).transpose(1, 2).contiguous().to(query.dtype), None

    def _read_back(self, layer: int, plan: LayerPlan, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``x`` as the cache reads it back from codes (keys: whole groups only), float32."""
        G = self.G
        o = self._options
        sinks, rotation, fit = o.sink_tokens, o.rotation, o.level_fit
        bits = plan.k_bits if kind == "k" else plan.v_bits
        shares = plan.k_shares if kind == "k" else plan.v_shares
        eta = float(self._eta.get(bits, 0.0))
        if kind == "k":
            x = x[:, :, : (x.shape[2] // G) * G]
            quantize, dequantize = quant.quantize_keys, quant.dequantize_keys
        else:
            quantize, dequantize = quant.quantize_values, quant.dequantize_values
        rotate = quant.hadamard if rotation else (lambda t: t)  # its own inverse

        def grouped(t):  # what the cache quantizes: with sinks, key groups see position S in their place
            if sinks and kind == "k" and t.shape[2] > sinks:
                return torch.cat([t[:, :, sinks : sinks + 1].expand(-1, -1, sinks, -1), t[:, :, sinks:]], 2)
            return t

        x = rotate(x)  # the domain the cache stores
        if kind == "v" and o.value_group_size:
            G = o.value_group_size  # channels per value group
        codes, scale, zero = quantize(grouped(x), bits, G, eta, fit)
        if shares:  # the odd layer's own scale and zero point, its partner's codes
            partner = rotate(self._kv[layer - 1][0 if kind == "k" else 1][:, :, : x.shape[2]])
            codes = quantize(grouped(partner), bits, G, 0.0, fit)[0]
            if fit == "lsq":
                scale, zero = quantize(grouped(x), bits, G, 0.0, fit, codes)[1:]
        # scale and zero point stored as the cache stores them: the activation dtype or metadata_dtype
        md = quant.metadata_dtype(o.metadata_dtype, x.dtype)
        out = dequantize(codes, quant.to_metadata(scale, md), quant.to_metadata(zero, md), G).to(x.dtype)
        if sinks:
            out = torch.cat([x[:, :, :sinks], out[:, :, sinks:]], 2)[:, :, : out.shape[2]]
        return rotate(out).float()


def _num_layers_and_sliding(model, length: int) -> tuple[int, list[bool]]:
    num_layers = kv_geometry(model.config)[0]
    cfg = text_config(model.config)
    window = getattr(cfg, "sliding_window", None)
    sliding = [t != "full_attention" and window is not None and window < length for t in layer_types(model.config)]
    return num_layers, sliding
