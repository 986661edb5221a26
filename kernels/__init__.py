"""visionattn.kernels: the shared attention kernel layer.

* :func:`na1d`, :func:`na2d`, :func:`na3d`: fused neighbourhood / windowed attention
  (NAT, DiNAT, MaxViT block and grid, HaloNet, HiLo, EfficientViT windows).
* :func:`merge_attentions`: combine attentions over disjoint key sets via their lse.
* :func:`layer_norm`: LayerNorm over the last dim with float32 statistics and a chosen output
  dtype (float32 residual stream in, autocast dtype out).
"""

from .layer_norm import layer_norm
from .merge import merge_attentions
from .na import na1d, na2d, na3d, neighborhood_attention

__all__ = ["layer_norm", "merge_attentions", "na1d", "na2d", "na3d", "neighborhood_attention"]

# Further kernel modules (e.g. routed / block-sparse attention) are imported below.

from .routed import routed_attention, routed_tiles
from .routing import bra_attention, bra_route, crop_from_grid, pad_to_grid, region_pool

__all__ += [
    "bra_attention",
    "bra_route",
    "crop_from_grid",
    "pad_to_grid",
    "region_pool",
    "routed_attention",
    "routed_tiles",
]
