"""One kernel launch as data, so that running it and compiling it ahead of time share one code path.

Every op module has a `plan_<op>` function that allocates the outputs and returns them with the
`Launch` it would make (grid, arguments, constexprs, num_warps, num_stages). The op runs the launch;
`benchmarks/triton_resources.py` calls the same plan functions on meta tensors and compiles each launch
for a GPU that is not there, so the configurations it checks are exactly those dispatch picks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Launch:
    kernel: Any                     # a triton.jit function (an interpreter wrapper under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple                     # every non-constexpr kernel argument, in order
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None   # software-pipelining depth of loops; None: triton's default

    def options(self) -> dict[str, int]:
        """The compile options of this launch (as keyword arguments of a launch or `triton.compile`)."""
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        return {"num_warps": self.num_warps, **stages}

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options())


def warps_for(tile_elements: int, per_thread: int) -> int:
    """Warps that give each thread about `per_thread` tile elements (a power of two in [1, 16]).

    Register use grows with the elements a thread holds; the compile test
    (tests/test_triton_compile.py) checks that the resulting configurations never spill.
    """
    warps = 1
    while warps < 16 and warps * 32 * per_thread < tile_elements:
        warps *= 2
    return warps
