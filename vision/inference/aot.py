"""``--compile`` as ahead-of-time packages: each tensor-shaped part of a detector exported once for every
image size, compiled by AOTInductor, and kept on disk, so that a later process loads it instead of
tracing again.

``torch.compile`` traces the model again in every process (on a 2-core CPU about 10 s for RetinaNet's
backbone and head, a cache of compiled code notwithstanding), which a run over a folder of photos does
not win back.  Here the first call of a part exports it (``torch.export``, heights and widths symbolic:
the backbone's as multiples of the transform's padding, the feature maps' each free), compiles the
program into a package (``torch._inductor.aoti_compile_and_package``: a shared library with the frozen
weights) and writes it atomically to the cache folder under a key of everything it depends on (the
part's structure and weights, the input's layout, torch's version, the CPU's vector extensions, which
Winograd transforms are built).  Any later process with the same key loads the package in a fraction of
a second.  Winograd convolutions enter it as the operator ``vision::winograd_conv3x3``.

Inputs the package was not made for (another batch size, a layout, a map smaller than its range) run the
part as it is; a part that cannot be exported is compiled by ``torch.compile`` as before, with a warning.

The cache folder is ``$VISION_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/vision/compiled`` (by default
``~/.cache/vision/compiled``).  Packages hold the weights: one for RetinaNet R50-FPN's backbone and head
takes about 250 MB.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from vision.atomic import exclusive_lock

log = logging.getLogger(__name__)

_FORMAT = b"vision-aot-2"  # bump when what a package holds changes
_MAX_SIDE = 8192  # the largest map side a package serves (pixels of the padded image for the backbone)


def cache_folder() -> Path:
    """Where compiled packages are kept (see the module docstring)."""
    configured = os.environ.get("VISION_COMPILE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vision" / "compiled"


class CompiledPart(nn.Module):
    """``part`` run through an AOTInductor package made (or loaded) on its first call for each input layout.

    ``image_multiple``: heights and widths of a single 4-D input are multiples of it (the transform pads
    images to it), which keeps the exported program free of guards on odd sizes.
    """

    def __init__(self, part: nn.Module, image_multiple: int = 1) -> None:
        super().__init__()
        self.part = part
        self.image_multiple = image_multiple
        self._runners: dict[Any, Any] = {}  # input layout -> loaded package, or None (run as it is)
        self._fallback: nn.Module | None = None
        self._weights_digest: bytes | None = None

    def forward(self, *args: Any) -> Any:
        if self._fallback is not None:
            return self._fallback(*args)
        flat, spec = pytree.tree_flatten(args)
        if (not flat or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in flat)
                or not _within(flat, self._multiple(flat))):
            return self.part(*args)
        device = flat[0].device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))  # traced in
        layout = (str(spec), tuple((t.dtype, t.device.type, t.shape[0], t.shape[1],
                                    t.is_contiguous(memory_format=torch.channels_last)) for t in flat),
                  autocast)
        if layout not in self._runners:
            self._runners[layout] = self._prepare(args, flat, spec, layout)
            if self._fallback is not None:
                return self._fallback(*args)
        runner = self._runners[layout]
        return self.part(*args) if runner is None else runner(*args)

    def _multiple(self, flat: list[torch.Tensor]) -> int:
        return self.image_multiple if len(flat) == 1 else 1

    def _prepare(self, args: tuple, flat: list[torch.Tensor], spec: pytree.TreeSpec, layout: Any):
        multiple = self._multiple(flat)
        path = cache_folder() / f"{self._key(layout, multiple)}.pt2"
        if not path.is_file():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with exclusive_lock(path.with_suffix(".lock")):  # others making this package wait for one
                    if not path.is_file():
                        self._compile(args, spec, len(flat), multiple, path)
            except Exception as e:  # any failure to export or compile: torch.compile instead
                log.warning("could not compile %s ahead of time (%s: %s); using torch.compile",
                            type(self.part).__name__, type(e).__name__, str(e).splitlines()[0][:200])
                self._fallback = torch.compile(self.part, dynamic=True)
                return None
        try:
            loaded = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # a damaged or foreign package: made again next time
            log.warning("could not load %s (%s); removed, running eagerly", path,
                        str(e).splitlines()[0][:200])
            path.unlink(missing_ok=True)
            return None
        log.info("loaded compiled %s from %s", type(self.part).__name__, path)
        return loaded

    def _compile(self, args: tuple, spec: pytree.TreeSpec, n_maps: int, multiple: int, path: Path) -> None:
        from torch.export import Dim

        def side(name: str):  # a map's height or width, in units of ``multiple``
            dim = Dim(name, min=_min_side(multiple) // multiple, max=_MAX_SIDE // multiple)
            return multiple * dim if multiple > 1 else dim

        dims = [{2: side(f"h{i}"), 3: side(f"w{i}")} for i in range(n_maps)]
        dynamic_shapes = pytree.tree_unflatten(dims, spec)
        log.warning("compiling %s ahead of time (once for every image size; kept in %s)",
                    type(self.part).__name__, path.parent)
        program = torch.export.export(self.part, args, dynamic_shapes=dynamic_shapes, strict=False)
        partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
            os.replace(partial, path)  # whole or not at all, also for a process compiling beside this one
        finally:
            partial.unlink(missing_ok=True)

    def _key(self, layout: Any, multiple: int) -> str:
        """Everything the package depends on, hashed."""
        if self._weights_digest is None:
            digest = hashlib.sha256()
            for name, tensor in self.part.state_dict().items():
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                # in logical order, whatever the memory layout
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().data)
            self._weights_digest = digest.digest()
        from vision.inference import winograd

        key = hashlib.sha256(_FORMAT)
        for part in (repr(self.part), repr(layout), str(multiple), torch.__version__, sys.version,
                     torch.backends.cpu.get_cpu_capability(), str(winograd._winograd_native is not None),
                     str(winograd.NATIVE_PRODUCT),
                     str(torch._inductor.config.freezing)):
            key.update(part.encode() + b"\0")
        key.update(self._weights_digest)
        return key.hexdigest()[:32]


def _min_side(multiple: int) -> int:
    return multiple if multiple > 1 else 2


def _within(flat: list[torch.Tensor], multiple: int) -> bool:
    """Whether every map's height and width is one the package serves."""
    low = _min_side(multiple)
    for t in flat:
        for side in t.shape[2:]:
            if side < low or side > _MAX_SIDE or side % multiple:
                return False
    return True
