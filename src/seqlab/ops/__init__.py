"""Pure tensor ops: each fast one beside its `*_ref` twin, a plain loop over time in ops/naive.py that shares no
helper with it (same signature; `impl="ref"` runs the twin).

    selective_scan / selective_scan_ref / selective_scan_step / selective_scan_update   Mamba's selective scan
    gla / gla_ref / gla_step / gla_update                                               gated linear attention
    delta_rule / delta_rule_ref / delta_rule_step / delta_rule_update                   the (gated) delta rule
    minrnn_scan / minrnn_scan_ref / minrnn_step / minrnn_update                         minGRU / minLSTM
    ssd / ssd_ref / ssd_step / ssd_update                                               Mamba-2's SSD scan

Every scan returns `(output, final_state_or_None)`; every step returns `(output, new_state)`. States are fp32.
"""

from seqlab.ops.delta_rule import delta_rule, delta_rule_step, delta_rule_update
from seqlab.ops.gla import gla, gla_step, gla_update
from seqlab.ops.minrnn import minrnn_scan, minrnn_step, minrnn_update
from seqlab.ops.naive import delta_rule_ref, gla_ref, minrnn_scan_ref, selective_scan_ref, ssd_ref
from seqlab.ops.selective_scan import selective_scan, selective_scan_step, selective_scan_update
from seqlab.ops.ssd import ssd, ssd_step, ssd_update

__all__ = ["gla", "gla_ref", "gla_step", "gla_update", "selective_scan", "selective_scan_ref", "selective_scan_step",
           "selective_scan_update", "minrnn_scan", "minrnn_scan_ref", "minrnn_step", "minrnn_update",
           "delta_rule", "delta_rule_ref", "delta_rule_step", "delta_rule_update", "ssd", "ssd_ref", "ssd_step",
           "ssd_update"]
