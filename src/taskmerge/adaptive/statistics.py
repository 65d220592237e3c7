"""The statistics the data-aware merges read from each task's training images: the diagonal Fisher
of an expert (Fisher merging) and the Grams of every linear map's inputs (RegMean, RegMean++).

The encoder's forward is taken apart here (`stem`, `block_with_inputs`, `pooled`) so that the input
of every linear map is at hand: open_clip's attention is an `nn.MultiheadAttention`, whose fused
`in_proj` and `out_proj` are applied inside one functional call that no module hook sees. The
pieces replicate open_clip 3.x's `VisionTransformer.forward` (as surgery_modules.deep_forward does)
and are tested against it.

Under torchrun each rank takes its share of the examples (whole batches for the Fisher, whose
FusionBench estimate squares a batch's gradient) and the sums are all-reduced, so every rank ends
with the statistics one process computes, up to rounding.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.compute import distributed
from taskmerge.merging.regmean import LinearMap, RegMeanAccumulator
from taskmerge.models.encoders import ImageEncoder

FISHER_ESTIMATES = ("fusionbench", "empirical")
POST_LAYERS = ("pretrained", "merged")
VISUAL = "model.visual."
BLOCKS = VISUAL + "transformer.resblocks."
# the linear maps of one residual block: (site, weight key suffix, bias key suffix)
BLOCK_MAPS = (("attn.in_proj", "attn.in_proj_weight", "attn.in_proj_bias"),
              ("attn.out_proj", "attn.out_proj.weight", "attn.out_proj.bias"),
              ("mlp.c_fc", "mlp.c_fc.weight", "mlp.c_fc.bias"),
              ("mlp.c_proj", "mlp.c_proj.weight", "mlp.c_proj.bias"))
STEM = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
POST = ("ln_post.", "proj")


def num_blocks(keys: Sequence[str]) -> int:
    ids = {int(k[len(BLOCKS):].split(".")[0]) for k in keys if k.startswith(BLOCKS)}
    return max(ids) + 1 if ids else 0


def linear_maps(keys: Sequence[str]) -> list[LinearMap]:
    """Every linear map of the vision tower among `keys` (the merged keys): in_proj (fused q/k/v),
    out_proj, c_fc and c_proj of each block, and the final projection `visual.proj`."""
    have = set(keys)
    out = []
    for i in range(num_blocks(keys)):
        for site, weight, bias in BLOCK_MAPS:
            w = f"{BLOCKS}{i}.{weight}"
            if w in have:
                b = f"{BLOCKS}{i}.{bias}"
                out.append(LinearMap(w, f"{BLOCKS}{i}.{site}", b if b in have else None))
    if VISUAL + "proj" in have:
        out.append(LinearMap(VISUAL + "proj", VISUAL + "proj", None, transposed=True))
    return out


def _check_block(block: nn.Module) -> None:
    if (not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or hasattr(block, "ln_1_kv")
            or not hasattr(block, "mlp") or not hasattr(block.mlp, "c_fc")):
        raise NotImplementedError(f"{type(block).__name__}: only open_clip's ResidualAttentionBlock "
                                  f"(CLIP ViTs) is taken apart for RegMean")


def stem(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tokens that enter the first block, batch-first (N, tokens, width)."""
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("attentional pooling (CoCa-style) vision towers are not supported")
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def block_with_inputs(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """block(x) for batch-first tokens x, and the input of each of its linear maps by site."""
    _check_block(block)
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
    x = x + block.ls_1(F.linear(a, attn.out_proj.weight, attn.out_proj.bias))
    h2 = block.ln_2(x)
    g = block.mlp.gelu(block.mlp.c_fc(h2))
    x = x + block.ls_2(block.mlp.c_proj(g))
    return x, {"attn.in_proj": h, "attn.out_proj": a, "mlp.c_fc": h2, "mlp.c_proj": g}


def pooled(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the final projection (ln_post of the pooled token)."""
    if visual.final_ln_after_pool:
        return visual.ln_post(visual._global_pool(x)[0])
    return visual._global_pool(visual.ln_post(x))[0]


def _blocks(visual: nn.Module) -> nn.ModuleList:
    if not getattr(visual.transformer, "batch_first", True):
        raise NotImplementedError("open_clip < 3 (sequence-first blocks) is not supported")
    return visual.transformer.resblocks


class _GramSums:
    """Σ XᵀX and the row count per Gram name, in `dtype` (float32, as FusionBench) on the run's
    device; the parity benchmark sets float64 to separate rounding from the algorithm."""
    dtype = torch.float32

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype)
        xtx = x.t() @ x
        if name in self.sums:
            self.sums[name].add_(xtx)
            self.rows[name] += x.shape[0]
        else:
            self.sums[name], self.rows[name] = xtx, x.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        """G = Σ XᵀX / rows over every rank: FusionBench's running mean over all tokens
        (fusion_bench/method/regmean/clip_regmean.py L72-92)."""
        names = sorted(self.sums)
        rows = distributed.sum_counts(*(self.rows[n] for n in names))
        out = {}
        for name, r in zip(names, rows):
            out[name] = (distributed.all_reduce_sum(self.sums[name]) / r).cpu()
        return out


@torch.no_grad()
def gram_matrices(encoder: ImageEncoder, images: TaskImages, maps: Sequence[LinearMap], *,
                  batch_size: int = 32, device: str | torch.device = "cpu",
                  desc: str = "Grams") -> dict[str, torch.Tensor]:
    """{gram name: G} of `encoder`'s own inputs to each map in `maps` on `images` (RegMean)."""
    wanted = {m.gram for m in maps}
    encoder = encoder.to(device).eval()
    visual = encoder.model.visual
    grams = _GramSums()
    part = distributed.shard(len(images))
    for x, _ in tqdm(images.batches(batch_size, part), desc=desc, leave=False,
                     total=-(-len(part) // batch_size)):
        tokens = stem(visual, x.to(device))
        for i, block in enumerate(_blocks(visual)):
            tokens, inputs = block_with_inputs(block, tokens)
            for site, inp in inputs.items():
                if f"{BLOCKS}{i}.{site}" in wanted:
                    grams.add(f"{BLOCKS}{i}.{site}", inp)
        if VISUAL + "proj" in wanted:
            grams.add(VISUAL + "proj", pooled(visual, tokens))
    return grams.means()


def diagonal_fisher(encoder: ImageEncoder, head: nn.Module, images: TaskImages, keys: Sequence[str], *,
                    estimate: str = "fusionbench", batch_size: int = 32,
                    device: str | torch.device = "cpu", desc: str = "Fisher") -> dict[str, torch.Tensor]:
    """{key: F} of `encoder` (the expert) through its task's frozen `head` on `images`, per entry.

    "fusionbench": FusionBench's estimate (fusion_bench/method/fisher_merging/
    clip_fisher_merging.py L151-186, from MergeLM): per batch, the gradient of
    Σ_examples Σ_classes √p·log p (p the model's own softmax, detached; no labels) squared, summed
    over batches and divided by the number of examples; the cross terms between a batch's examples
    and classes stay in. "empirical": the empirical Fisher, each example's gradient of its
    cross-entropy at the true label squared, averaged. A key without a gradient (the text-side
    leftovers) gets F = 0."""
    if estimate not in FISHER_ESTIMATES:
        raise ValueError(f"estimate {estimate!r}: one of {FISHER_ESTIMATES}")
    encoder = encoder.to(device).eval()
    head = head.to(device)
    params = dict(encoder.named_parameters())
    state = encoder.state_dict()
    unknown = [k for k in keys if k not in state]
    if unknown:
        raise ValueError(f"keys {unknown[:3]} are not in the encoder's state dict")
    for p in encoder.parameters():
        p.requires_grad_(False)
    trained = [k for k in keys if k in params]   # a buffer has no gradient: F = 0
    chosen = [params[k] for k in trained]
    for p in chosen:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    n = len(images)
    starts = list(range(0, n, batch_size))
    mine = starts[distributed.rank()::distributed.world_size()]   # whole batches per rank
    try:
        for start in tqdm(mine, desc=desc, leave=False):
            idx = torch.arange(start, min(start + batch_size, n))
            x = images.take(idx).to(device)
            if estimate == "fusionbench":
                logits = head(encoder(x))
                p = torch.softmax(logits, dim=-1).detach()
                objective = (p.sqrt() * torch.log_softmax(logits, dim=-1)).sum()
                _add_squares(sums, torch.autograd.grad(objective, chosen, allow_unused=True))
            else:
                y = images.labels[idx].to(device)
                for j in range(len(idx)):
                    loss = F.cross_entropy(head(encoder(x[j:j + 1])), y[j:j + 1])
                    _add_squares(sums, torch.autograd.grad(loss, chosen, allow_unused=True))
    finally:
        for p in encoder.parameters():
            p.requires_grad_(False)
    out = {k: (distributed.all_reduce_sum(s) / n).cpu() for k, s in zip(trained, sums)}
    return {k: out[k] if k in out else torch.zeros(state[k].shape) for k in keys}


def _add_squares(sums: list[torch.Tensor], grads) -> None:
    for s, g in zip(sums, grads):
        if g is not None:
            s.addcmul_(g.float(), g.float())


def _mean_of(experts: Mapping[str, Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    total = None
    for sd in experts.values():
        t = sd[key].float()
        total = t.clone() if total is None else total.add_(t)
    return total / len(experts)


def _load_block(block: nn.Module, state: Mapping[str, torch.Tensor], prefix: str) -> None:
    block.load_state_dict({k: state[prefix + k] for k in block.state_dict()}, strict=True)


@torch.no_grad()
def regmean_plusplus(encoder: ImageEncoder, pretrained: Mapping[str, torch.Tensor],
                     experts: Mapping[str, Mapping[str, torch.Tensor]], images: Mapping[str, TaskImages],
                     keys: Sequence[str], *, ratio: float, ridge: float = 0.0, post: str = "pretrained",
                     batch_size: int = 32, device: str | torch.device = "cpu",
                     log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """RegMean++ (Nguyen et al. 2025; FusionBench fusion_bench/method/regmean_plusplus/
    regmean_plusplus.py `run` L164-311, clip_regmean_plusplus.py): block by block, each task's
    images reach block l through the blocks already merged; each expert's Grams are taken on those
    inputs through its own block l (so out_proj, c_fc and c_proj see the expert's own sub-blocks,
    FusionBench's `layer(batch)` on the expert's layer), the block is merged by RegMean and every
    task's inputs move on through the merged block. The stem (patch embedding, class and position
    embeddings, ln_pre) is the experts' mean first. `post`: "pretrained" leaves ln_post and the
    projection at θ0, as FusionBench and the original, whose loop writes only the stem and the
    blocks; "merged" merges them as RegMean does (ln_post the mean, the projection by RegMean on
    its inputs through the merged blocks and each expert's ln_post).

    `encoder` is a scratch module of the architecture; `keys` the merged keys (others keep θ0);
    every other merged key outside stem, blocks and post is the experts' mean."""
    if post not in POST_LAYERS:
        raise ValueError(f"post {post!r}: one of {POST_LAYERS}")
    keys = list(keys)
    merged = {k: v.clone() for k, v in pretrained.items()}
    stem_keys = [k for k in keys if k.startswith(VISUAL) and k[len(VISUAL):].startswith(STEM)]
    post_keys = [k for k in keys if k.startswith(VISUAL) and k[len(VISUAL):].startswith(POST)]
    rest = [k for k in keys if k not in set(stem_keys) | set(post_keys) and not k.startswith(BLOCKS)]
    for k in stem_keys + rest:
        merged[k] = _mean_of(experts, k).to(pretrained[k].dtype)
    encoder = encoder.to(device).eval()
    encoder.load_state_dict({k: merged[k] for k in encoder.state_dict()}, strict=True)
    visual = encoder.model.visual
    blocks = _blocks(visual)
    tasks = list(experts)
    # each task's tokens entering the next block (this rank's share, batch by batch, on the CPU)
    inputs: dict[str, list[torch.Tensor]] = {}
    for t in tasks:
        task_images = images[t]   # read once: `images` may read each task's images on demand
        part = distributed.shard(len(task_images))
        inputs[t] = [stem(visual, x.to(device)).cpu() for x, _ in task_images.batches(batch_size, part)]
    maps = linear_maps(keys)
    scratch = copy.deepcopy(blocks[0])
    for i in tqdm(range(len(blocks)), desc="RegMean++ blocks", leave=False):
        prefix = f"{BLOCKS}{i}."
        block_keys = [k for k in keys if k.startswith(prefix)]
        block_maps = [m for m in maps if m.weight.startswith(prefix)]
        wanted = {m.gram for m in block_maps}
        acc = RegMeanAccumulator(pretrained, block_maps, block_keys, ratio=ratio, ridge=ridge)
        for t in tasks:
            _load_block(scratch, experts[t], prefix)
            grams = _GramSums()
            for x in inputs[t]:
                _, sites = block_with_inputs(scratch, x.to(device))
                for site, inp in sites.items():
                    if prefix + site in wanted:
                        grams.add(prefix + site, inp)
            acc.add({k: experts[t][k] for k in block_keys}, grams.means())
        merged.update(acc.merged(only_merged=True))
        _load_block(blocks[i], merged, prefix)
        for t in tasks:
            inputs[t] = [block_with_inputs(blocks[i], x.to(device))[0].cpu() for x in inputs[t]]
    if post == "merged" and post_keys:
        post_maps = [m for m in maps if m.weight in set(post_keys)]
        acc = RegMeanAccumulator(pretrained, post_maps, post_keys, ratio=ratio, ridge=ridge)
        for t in tasks:
            for k in post_keys:
                if k.startswith(VISUAL + "ln_post."):
                    getattr(visual.ln_post, k.rsplit(".", 1)[1]).copy_(experts[t][k])
            grams = _GramSums()
            if post_maps:
                for x in inputs[t]:
                    grams.add(VISUAL + "proj", pooled(visual, x.to(device)))
            acc.add({k: experts[t][k] for k in post_keys}, grams.means() if post_maps else {})
        merged.update(acc.merged(only_merged=True))
    log(f"RegMean++: {len(blocks)} blocks merged in order; stem {'/'.join(STEM)} averaged; "
        f"ln_post and proj {'kept at θ0 (the original)' if post == 'pretrained' else 'merged'}")
    return merged
