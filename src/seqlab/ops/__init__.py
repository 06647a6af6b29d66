"""Pure tensor ops, each fast one next to its `*_ref` twin (a plain sequential loop, same signature).

    selective_scan / selective_scan_ref / selective_scan_step / selective_scan_update   Mamba's selective scan
    gla / gla_ref / gla_step / gla_update                                               gated linear attention

Every scan returns `(output, final_state_or_None)`; every step returns `(output, new_state)`. States are fp32.
"""

from seqlab.ops.gla import gla, gla_ref, gla_step, gla_update
from seqlab.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_step, selective_scan_update

__all__ = ["gla", "gla_ref", "gla_step", "gla_update", "selective_scan", "selective_scan_ref", "selective_scan_step",
           "selective_scan_update"]
