"""Attach to any torch model: capture, splice, steer and ablate module activations.

Hook points are the model's own module paths, exactly as ``model.named_modules()`` prints them
(``"model.layers.15"``, ``"model.layers.3.mlp"``), and shell-style globs over them
(``"model.layers.*.mlp"``; ``*`` stays within one path component, ``**`` spans several). Every
function here is a context manager: its hooks live only inside
the ``with`` block and are removed on exit, also when the body raises.

A point ending in ``":input"`` (``"model.layers.15.mlp:input"``) names the module's *input*
instead (its first positional argument): what a transcoder reads. A module's *output* is what
its ``forward`` returns; when that is a tuple or list (older Hugging
Face decoder layers return ``(hidden_states, ...)``) the first element is the activation and the
rest is passed through untouched.

The SAE protocol is duck-typed (nothing here imports :mod:`sae`): an object with
``encode(x) -> z`` and ``decode(z) -> x_hat`` for ``x`` of shape ``(..., d_in)`` and ``z`` of shape
``(..., d_sae)``, and an attribute ``W_dec`` of shape ``(d_sae, d_in)``. The activation is cast to
``W_dec``'s dtype before ``encode`` and the result cast back to the module's dtype.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> resolve(net, "*")
['0', '1', '2']
>>> with capture(net, ["0", "2"]) as acts:
...     y = net(torch.ones(1, 3))
>>> acts["0"].shape, torch.equal(acts["2"], y)
(torch.Size([1, 4]), True)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "INPUT",
    "Capture",
    "HookPointError",
    "SAELike",
    "Splice",
    "ablate",
    "capture",
    "match",
    "patch",
    "resolve",
    "splice",
    "steer",
]


class SAELike(Protocol):
    """What :func:`splice`, :func:`steer` and :func:`ablate` need from a sparse autoencoder."""

    W_dec: Tensor

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...


class HookPointError(KeyError, ValueError):
    """A hook point that names no module of the model (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0]) if self.args else ""


class _StopForward(Exception):
    """Raised from a hook to abort a forward once what it needs is recorded (also used by
    :mod:`sparsecode.prune` to stop calibration forwards after the last block it needs)."""


# ----------------------------------------------------------------------------- resolving

#: Suffix of a hook point that names a module's input rather than its output.
INPUT = ":input"


def split_point(point: str) -> tuple[str, bool]:
    """``(module path, is_input)`` of a hook point.

    >>> split_point("model.layers.3.mlp:input"), split_point("model.layers.3.mlp")
    (('model.layers.3.mlp', True), ('model.layers.3.mlp', False))
    """
    if point.endswith(INPUT):
        return point[: -len(INPUT)], True
    return point, False


def _suggest(point: str, names: list[str]) -> str:
    """A hint listing the module paths closest to ``point``."""
    suffix = [n for n in names if n.endswith("." + point)]
    close = difflib.get_close_matches(point, names, n=5, cutoff=0.5)
    picks = list(dict.fromkeys(suffix[:3] + close))[:5]
    if picks:
        return "close matches: " + ", ".join(repr(p) for p in picks)
    shown = [n for n in names if n][:8]
    return "the model's modules start with: " + ", ".join(repr(p) for p in shown)


def _glob_regex(pattern: str) -> re.Pattern:
    """Compile a module-path glob: ``*`` and ``?`` stay within a component, ``**`` spans them."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and pattern.find("]", i + 1) > i:
            j = pattern.find("]", i + 1)
            body = pattern[i + 1 : j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def resolve(model: nn.Module, points: str | Sequence[str]) -> list[str]:
    """Module paths of ``model`` named by ``points`` (exact paths or globs), in module order.

    Each entry is either an exact path from ``model.named_modules()`` (``""`` is the model
    itself) or a glob over those paths: ``*`` matches within one dotted component
    (``"model.layers.*"`` is the layers, not their submodules), ``**`` across components
    (``"model.**.mlp"``), ``?`` one character, ``[...]`` a character class. The result
    has no duplicates and follows the order in which ``named_modules()`` lists the modules (a
    module's ``":input"`` point before its output); patterns never match the model itself
    (name it ``""`` explicitly). A ``":input"`` suffix carries over to every match.
    A name that is not a module, or a pattern that matches nothing, raises
    :class:`HookPointError` (a ``KeyError`` and ``ValueError``) listing close matches.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU()))
    >>> resolve(net, ["1.0", "0"])
    ['0', '1.0']
    >>> resolve(net, "*"), resolve(net, "**")
    (['0', '1'], ['0', '1', '1.0'])
    >>> resolve(net, ["1.0", "*:input"])
    ['0:input', '1:input', '1.0']
    >>> resolve(net, "1.1")
    Traceback (most recent call last):
    ...
    sparsecode.hooks.HookPointError: no module '1.1' in Sequential; close matches: '1.0', '1'
    """
    return match([name for name, _ in model.named_modules()], points, type(model).__name__)


def match(names: Sequence[str], points: str | Sequence[str], owner: str) -> list[str]:
    """The hook points among module paths ``names`` that ``points`` name, as :func:`resolve`
    (which calls it with the model's modules) does; ``owner`` names where the paths come from in
    errors. Also resolves points against stored activations (an activation cache's hook points,
    ``":input"`` suffixes removed).

    >>> match(["", "model.layers.0", "model.layers.1"], "model.layers.*:input", "a cache")
    ['model.layers.0:input', 'model.layers.1:input']
    """
    if isinstance(points, str):
        points = [points]
    names = list(names)
    known = set(names)
    wanted: set[tuple[str, bool]] = set()
    for full in points:
        if not isinstance(full, str):
            raise TypeError(f"hook points are strings, got {type(full).__name__}: {full!r}")
        point, is_input = split_point(full)
        if point in known:
            wanted.add((point, is_input))
            continue
        if any(c in point for c in "*?["):
            rx = _glob_regex(point)
            hits = [n for n in names if n and rx.match(n)]  # "" only by its exact name
            if hits:
                wanted.update((h, is_input) for h in hits)
                continue
            raise HookPointError(
                f"pattern {point!r} matches no module of {owner}; "
                + _suggest(point.replace("*", "").replace("?", ""), names)
            )
        raise HookPointError(f"no module {point!r} in {owner}; " + _suggest(point, names))
    return [n + (INPUT if is_input else "") for n in names for is_input in (True, False)
            if (n, is_input) in wanted]


def _modules(model: nn.Module, points: str | Sequence[str]) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    return {p: mods[split_point(p)[0]] for p in resolve(model, points)}


# ----------------------------------------------------------------------------- helpers


def _first(value: Any, point: str) -> Tensor:
    """The activation tensor in a module's output (first element of a tuple/list/ModelOutput)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if hasattr(value, "to_tuple"):  # transformers.ModelOutput
        items = value.to_tuple()
        if items and isinstance(items[0], Tensor):
            return items[0]
    raise TypeError(
        f"module {point!r} produced {type(value).__name__}, not a tensor or a tuple starting "
        "with one; hook a submodule that outputs a tensor"
    )


def _replace_first(value: Any, new: Tensor) -> Any:
    """``value`` with its activation tensor replaced by ``new`` (rest of a tuple kept)."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot replace the activation inside a {type(value).__name__} output")


def _edit_hook(fn: Callable[[Tensor], Tensor], point: str) -> Callable:
    """A forward hook that rewrites the module's activation with ``fn``."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _replace_first(output, fn(_first(output, point)))

    return hook


def _sae_call(sae: SAELike, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, x_hat)`` for activation ``x``, computed in the SAE's dtype, ``x_hat`` in ``x``'s."""
    xs = x.to(sae.W_dec.dtype)
    z = sae.encode(xs)
    return z, sae.decode(z).to(x.dtype)


@contextmanager
def _hooked(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _editing(edits: dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]) -> Iterator[None]:
    """Replace the output of each module by ``edit(output)`` (``edits``: point -> (module,
    edit)) inside the block; the hooks are removed on exit, also on error."""
    handles: list = []
    with _hooked(handles):
        for point, (module, edit) in edits.items():
            handles.append(module.register_forward_hook(_edit_hook(edit, point)))
        yield


# ----------------------------------------------------------------------------- capture


class Capture(Mapping):
    """Activations recorded by :func:`capture`: a mapping ``point -> tensor`` from the last forward.

    Values are replaced on every forward of the model (a point that did not run in the most
    recent forward is absent). ``stopped`` tells whether the last :meth:`run` was cut short by
    ``stop_early``.
    """

    def __init__(self, model: nn.Module, points: list[str]):
        self.model = model
        self.points = points
        self.stopped = False
        self._values: dict[str, Tensor] = {}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``model(*args, **kwargs)``; returns its output, or ``None`` if stopped early.

        With ``stop_early=True`` the forward is aborted by an internal exception once every
        point is recorded; this method swallows that exception (calling ``model(...)`` directly
        would let it escape), so use it for the forward whenever ``stop_early`` is on.
        """
        self.stopped = False
        try:
            return self.model(*args, **kwargs)
        except _StopForward:
            self.stopped = True
            return None

    def __getitem__(self, point: str) -> Tensor:
        try:
            return self._values[point]
        except KeyError:
            where = "is not captured" if point not in self.points else "has not run yet"
            raise KeyError(f"hook point {point!r} {where}; captured: {self.points}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shapes = {p: tuple(v.shape) for p, v in self._values.items()}
        return f"Capture({shapes})"


@contextmanager
def capture(
    model: nn.Module,
    points: str | Sequence[str],
    *,
    inputs: bool = False,
    stop_early: bool = False,
    detach: bool = True,
) -> Iterator[Capture]:
    """Record module outputs (or first positional inputs) during forwards of ``model``.

    Yields a :class:`Capture`, a mapping from each resolved point to the tensor of the most
    recent forward: the module's output (first element of a tuple output) or, with
    ``inputs=True``, its first positional argument (first tensor keyword if it has none).
    ``detach=False`` keeps the autograd graph.

    With ``stop_early=True`` the forward is aborted as soon as every point has been recorded
    (right after the last needed module ran, or before it runs when capturing inputs), so no
    compute is spent on later layers; run the model through :meth:`Capture.run`, which swallows
    the abort. Each point is recorded at its first call in a forward in that mode.

    Hooks run in registration order: inside :func:`splice` a capture sees the spliced output.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> with capture(net, "1", inputs=True, stop_early=True) as acts:
    ...     out = acts.run(torch.zeros(4, 2))
    >>> out is None, acts.stopped, torch.equal(acts["1"], net[0](torch.zeros(4, 2)))
    (True, True, True)
    """
    modules = _modules(model, points)
    names = list(modules)
    cap = Capture(model, names)
    seen: set[str] = set()

    def start(module: nn.Module, args: tuple) -> None:
        cap._values.clear()
        seen.clear()

    def record(point: str, value: Tensor) -> None:
        if stop_early and point in seen:
            return
        cap._values[point] = value.detach() if detach else value
        seen.add(point)
        if stop_early and len(seen) == len(names):
            raise _StopForward

    def make_hook(point: str) -> Callable:
        if inputs or split_point(point)[1]:

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if args and isinstance(args[0], Tensor):
                    value = args[0]
                else:
                    value = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
                    if value is None:
                        raise TypeError(f"module {point!r} was called without a tensor input")
                record(point, value)

            return pre_hook

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            record(point, _first(output, point))

        return hook

    handles = [model.register_forward_pre_hook(start)]
    with _hooked(handles):
        for point, module in modules.items():
            if inputs or split_point(point)[1]:
                handles.append(module.register_forward_pre_hook(make_hook(point), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(make_hook(point)))
        yield cap


# ----------------------------------------------------------------------------- splice


class Splice:
    """State of an active :func:`splice` or :func:`ablate`: the latest latents and errors.

    ``latents[point]`` is the SAE code ``z`` of the most recent forward and ``errors[point]`` the
    reconstruction error ``x - x_hat`` (both keep the autograd graph when grad is enabled, so
    attribution through the latents works).
    """

    def __init__(self) -> None:
        self.latents: dict[str, Tensor] = {}
        self.errors: dict[str, Tensor] = {}


def _per_point(
    model: nn.Module, saes: Mapping[str, SAELike], what: str
) -> dict[str, tuple[nn.Module, SAELike]]:
    if not isinstance(saes, Mapping) or not saes:
        raise TypeError(f"{what} takes a non-empty mapping {{hook point: sae}}, got {saes!r}")
    mods = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, SAELike]] = {}
    for key, sae in saes.items():
        for m in ("encode", "decode"):
            if not callable(getattr(sae, m, None)):
                raise TypeError(f"the SAE for {key!r} has no {m}() method")
        if getattr(sae, "W_dec", None) is None:
            raise TypeError(f"the SAE for {key!r} has no W_dec attribute (d_sae, d_in)")
        for point in resolve(model, key):
            if split_point(point)[1]:
                raise ValueError(f"{what} edits module outputs; {point!r} is an input")
            out[point] = (mods[point], sae)
    return out


@contextmanager
def splice(
    model: nn.Module, saes: Mapping[str, SAELike], *, keep_error: bool = False
) -> Iterator[Splice]:
    """Replace module outputs by their SAE reconstruction ``decode(encode(x))``.

    ``saes`` maps hook points (or globs) to SAEs. With ``keep_error=True`` the output becomes
    ``x_hat + (x - x_hat)``, numerically the original output (exact up to rounding) while the
    latents are observable and on the autograd path. Yields a :class:`Splice` whose
    ``latents[point]`` and ``errors[point]`` hold the latest forward's values.

    >>> class Zero:  # an SAE that reconstructs nothing
    ...     W_dec = torch.zeros(1, 2)
    ...     def encode(self, x): return x[..., :1] * 0
    ...     def decode(self, z): return z @ self.W_dec
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> with splice(net, {"0": Zero()}) as sp:
    ...     net(torch.ones(1, 2)).tolist()
    [[0.0, 0.0]]
    >>> sp.latents["0"].shape
    torch.Size([1, 1])
    """
    targets = _per_point(model, saes, "splice")
    state = Splice()

    def make(point: str, sae: SAELike) -> Callable[[Tensor], Tensor]:
        def edit(x: Tensor) -> Tensor:
            z, x_hat = _sae_call(sae, x)
            err = x - x_hat
            state.latents[point] = z
            state.errors[point] = err
            return x_hat + err if keep_error else x_hat

        return edit

    with _editing({p: (module, make(p, sae)) for p, (module, sae) in targets.items()}):
        yield state


# ----------------------------------------------------------------------------- steer / ablate


@contextmanager
def patch(model: nn.Module, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Replace module outputs by given tensors (activation patching): ``values`` maps each hook
    point (an exact module path, an output) to the activation it outputs in every forward
    inside the block, of the shape the module produces. Used to splice in what a dictionary
    computed from a clean forward (a crosscoder writes several layers at once).

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> with patch(net, {"0": torch.full((1, 2), -1.0)}):
    ...     net(torch.ones(1, 2)).tolist()
    [[0.0, 0.0]]
    """
    mods = dict(model.named_modules())
    edits = {}
    for point, value in values.items():
        module_path, is_input = split_point(point)
        if is_input or module_path not in mods:
            raise HookPointError(f"patch replaces module outputs; {point!r} is not a module of "
                                 f"{type(model).__name__}")

        def replace(x: Tensor, value: Tensor = value, point: str = point) -> Tensor:
            if x.shape != value.shape:
                raise ValueError(f"patch for {point!r} has shape {tuple(value.shape)}, the "
                                 f"module outputs {tuple(x.shape)}")
            return value.to(x.dtype)

        edits[point] = (mods[module_path], replace)
    with _editing(edits):
        yield


@contextmanager
def steer(
    model: nn.Module,
    point: str,
    sae_or_direction: SAELike | Tensor,
    latent: int | None = None,
    coefficient: float = 1.0,
) -> Iterator[Tensor]:
    """Add ``coefficient * direction`` to the output of ``point`` at every position.

    The direction is ``W_dec[latent]`` of an SAE, or ``sae_or_direction`` itself when it is a
    ``(d_in,)`` tensor (then ``latent`` must be ``None``). ``point`` may be a glob (every match
    is steered). Yields the added vector.

    >>> net = torch.nn.Sequential(torch.nn.Identity())
    >>> with steer(net, "0", torch.tensor([1.0, 0.0]), coefficient=3.0):
    ...     net(torch.zeros(2))
    tensor([3., 0.])
    """
    if isinstance(sae_or_direction, Tensor):
        if latent is not None:
            raise ValueError("latent must be None when steering along a given direction tensor")
        direction = sae_or_direction
        if direction.dim() != 1:
            raise ValueError(f"direction must be 1-D (d_in,), got shape {tuple(direction.shape)}")
    else:
        W_dec = getattr(sae_or_direction, "W_dec", None)
        if W_dec is None:
            raise TypeError("steer needs a direction tensor or an SAE with W_dec (d_sae, d_in)")
        if latent is None:
            raise ValueError("give the latent index to steer with an SAE's decoder row")
        if not -W_dec.shape[0] <= latent < W_dec.shape[0]:
            raise IndexError(f"latent {latent} out of range for an SAE with {W_dec.shape[0]}")
        direction = W_dec[latent]
    delta = (coefficient * direction).detach()

    def edit(x: Tensor) -> Tensor:
        if x.shape[-1] != delta.shape[-1]:
            raise ValueError(
                f"steering vector has size {delta.shape[-1]} but the activation has {x.shape[-1]}"
            )
        return x + delta.to(device=x.device, dtype=x.dtype)

    with _editing({p: (module, edit) for p, module in _modules(model, point).items()}):
        yield delta


@contextmanager
def ablate(
    model: nn.Module,
    saes: Mapping[str, SAELike],
    latents: Sequence[int] | Mapping[str, Sequence[int]],
) -> Iterator[Splice]:
    """Remove chosen SAE latents' contributions from module outputs.

    The output ``x`` becomes ``x - sum_{j in latents} z_j W_dec[j]`` with ``z = encode(x)``: the
    SAE's error term and every other latent (and the decoder bias) stay, only the chosen latents'
    decoder contributions are subtracted. ``latents`` is one list for every point or a mapping
    ``point -> list``. Yields a :class:`Splice` recording the latents of the last forward.

    >>> class Id:  # latents are the coordinates themselves
    ...     W_dec = torch.eye(2)
    ...     def encode(self, x): return x
    ...     def decode(self, z): return z
    >>> net = torch.nn.Sequential(torch.nn.Identity())
    >>> with ablate(net, {"0": Id()}, [1]):
    ...     net(torch.tensor([2.0, 5.0]))
    tensor([2., 0.])
    """
    targets = _per_point(model, saes, "ablate")
    state = Splice()

    def chosen(point: str, key_of: dict[str, str]) -> list[int]:
        if isinstance(latents, Mapping):
            for k in (point, key_of[point]):
                if k in latents:
                    return list(latents[k])
            raise KeyError(f"no latents given for hook point {point!r}")
        return list(latents)

    key_of = {p: k for k in saes for p in resolve(model, k)}

    def make(point: str, sae: SAELike) -> Callable[[Tensor], Tensor]:
        idx = torch.as_tensor(chosen(point, key_of), dtype=torch.long)
        n = sae.W_dec.shape[0]
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"latents {idx.tolist()} out of range for an SAE with {n} latents")

        def edit(x: Tensor) -> Tensor:
            z = sae.encode(x.to(sae.W_dec.dtype))
            state.latents[point] = z
            i = idx.to(z.device)
            removed = z[..., i] @ sae.W_dec[i]
            return x - removed.to(x.dtype)

        return edit

    with _editing({p: (module, make(p, sae)) for p, (module, sae) in targets.items()}):
        yield state
