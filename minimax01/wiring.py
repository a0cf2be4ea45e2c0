"""Late binding for the one call DESIGN's contract puts on a lower layer whose work is done in a
higher one: `MiniMaxForCausalLM.from_pretrained` / `.save_pretrained` live on the model (model/)
but are implemented by `minimax01.checkpoint`, which sits above model/ because it builds and
inspects models. model/ asks `implementation("pretrained")`; this table, at the bottom of the
package, names the module that implements each role, so no module imports a layer above its
own and there is no import cycle (checkpoint/ imports model/, never the reverse)."""

from __future__ import annotations

import importlib

IMPLEMENTATIONS = {
    # load_pretrained(cls, path, **options) and save_pretrained(model, path, **options)
    "pretrained": "minimax01.checkpoint.pretrained",
    # load_vl(cls, path, **options) and save_vl(model, path, **options): MiniMax-VL-01
    "vl_pretrained": "minimax01.checkpoint.vl",
}


def implementation(role: str):
    """The module implementing `role` (imported on first use)."""
    return importlib.import_module(IMPLEMENTATIONS[role])
