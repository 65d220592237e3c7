"""Tiny random state dicts with an open_clip ViT's key names and key classes (METHODS_RECORDS.md §0):
two residual blocks of width 8 (the fused 24 × 8 `in_proj`), `visual.positional_embedding` and
`visual.proj`, a 4-D conv1, LayerNorms and biases, the text leftovers whose task vectors are exactly
zero, and an int64 buffer that no method may touch."""
import torch

WIDTH, EMBED = 8, 6


def vit_shapes(blocks: int = 2) -> dict[str, tuple[int, ...]]:
    d = WIDTH
    shapes = {"model.visual.class_embedding": (d,), "model.visual.positional_embedding": (5, d),
              "model.visual.conv1.weight": (d, 3, 2, 2), "model.visual.ln_pre.weight": (d,),
              "model.visual.ln_pre.bias": (d,)}
    for i in range(blocks):
        block = f"model.visual.transformer.resblocks.{i}."
        shapes |= {block + "ln_1.weight": (d,), block + "ln_1.bias": (d,),
                   block + "attn.in_proj_weight": (3 * d, d), block + "attn.in_proj_bias": (3 * d,),
                   block + "attn.out_proj.weight": (d, d), block + "attn.out_proj.bias": (d,),
                   block + "ln_2.weight": (d,), block + "ln_2.bias": (d,),
                   block + "mlp.c_fc.weight": (4 * d, d), block + "mlp.c_fc.bias": (4 * d,),
                   block + "mlp.c_proj.weight": (d, 4 * d), block + "mlp.c_proj.bias": (d,)}
    return shapes | {"model.visual.ln_post.weight": (d,), "model.visual.ln_post.bias": (d,),
                     "model.visual.proj": (d, EMBED)}


TEXT_LEFTOVERS = {"model.positional_embedding": (7, EMBED), "model.text_projection": (EMBED, EMBED),
                  "model.token_embedding.weight": (20, EMBED), "model.ln_final.weight": (EMBED,),
                  "model.ln_final.bias": (EMBED,), "model.logit_scale": ()}
BLOCK_MATRIX_SUFFIXES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight",
                         "mlp.c_proj.weight")


def is_block_matrix(key: str) -> bool:
    return key.endswith(BLOCK_MATRIX_SUFFIXES)


def vit_like(num_tasks: int, seed: int = 0, scale: float = 0.05):
    """(θ0, {task: θ_t}) with random θ0 and τ_t = scale·randn on the vision keys, zero on the text."""
    g = torch.Generator().manual_seed(seed)
    vision = vit_shapes()
    theta0 = {k: torch.randn(s, generator=g) for k, s in (vision | TEXT_LEFTOVERS).items()}
    theta0["model.steps"] = torch.tensor([3], dtype=torch.int64)
    experts = {}
    for t in range(num_tasks):
        expert = {k: v + scale * torch.randn(v.shape, generator=g) if k in vision else v.clone()
                  for k, v in theta0.items() if v.is_floating_point()}
        expert["model.steps"] = torch.tensor([50 + t], dtype=torch.int64)
        experts[f"task{t}"] = expert
    return theta0, experts


def taus_of(theta0: dict, experts: dict, key: str) -> list[torch.Tensor]:
    return [expert[key] - theta0[key] for expert in experts.values()]
