"""The T2S-DA pulling loss (method.md 5.2-5.7 and 5.9; paper sections 3.3-3.5).

Modules: `options` (the one frozen `PullOptions`, from `config.pull`), `sampling` (the
fixed-size draws of queries and negatives), `loss` (one sampling group's loss), `groups`
(sampling groups on the device mesh, the entry point `pulling_loss`).

Queries are student projector features of the pseudo-target image at pixels of class c
(labels: the source labels); each is pulled to its positive key, the source prototype
of class c (mean of the teacher's L2-normalised source features of class c,
re-normalised), and, for InfoNCE, pushed from M negatives: teacher source features of
other classes and *unreliable* teacher target features (confidence below the
alpha-quantile of the target confidence) pseudo-labelled as another class.

Sampling groups. The batch is split into G contiguous groups of b = B / G images along
its leading axis (`num_groups`; default one per device of the mesh's 'data' axis, 1
without a mesh). Each group draws its queries and negatives from its own pixels only,
with its own key (`fold_in(key, group)`; with G = 1 the key itself): CBQS over the
group's class shares with base ceil(N / G) queries (N * b / B rounded up, so the batch
holds about N K_b queries whatever G: N counts per batch, as on one device), M negatives
per query, the unreliable threshold the alpha-quantile of the group's own target
confidences (logged: the groups' mean). Only per-class statistics cross groups (`jax.lax.psum` over the group
axes): prototype sums and counts (K x D, K), DRW confidence sums and counts (K) and the
per-class loss sums and query counts (K), so prototypes, DRW weights and L_pull are those
of the whole batch. Why: drawing from the whole batch on a mesh makes every device sort
all label maps (all-gathers) and gather negatives from all devices (an all-reduce of the
gathered keys, 7.4x the gradient at paper scale); per group nothing but the K x D sums
moves. The group function runs under `jax.vmap(axis_name=GROUP_AXIS)` over the groups
of one device inside `jax.shard_map` over 'data', so 1 device with G = 8 computes what 8
devices compute. With G = 1 this is the whole-batch loss of the paper.

Every draw has a fixed size and is taken with replacement from a masked candidate set,
so the loss compiles once whatever classes a batch holds:

* Candidate sets are contiguous blocks of one argsort of the pixels by class. A uniform
  member of class c is `order[start_c + randint(count_c)]`; a uniform member of "any
  class but c" is `order[u + count_c * (u >= start_c)]`, u ~ randint(total - count_c).
  Each draw is O(1): no (pixels x queries) masks or gathers.
* Queries fill a static budget of slots: class-balanced (CBQS) N_c = ceil(N K_b rho_c)
  sums to less than N K_b + K_b, so (N + 1) K slots always suffice (N K when
  class-equalised, N_c = N). Slot j belongs to the class whose cumulative count first
  exceeds j; unused slots are masked. rho_c and K_b count the candidate query pixels
  (valid labels of classes that have a positive key in the batch: with the default
  domains, every valid source pixel). [our reading of eq. 16]
* Negatives: M per query slot, M/2 from each domain with DENPS (the first M // 2
  columns source, the rest target), else M from the union of both candidate sets.
  A domain without candidates for class c leaves its columns masked.

Memory at paper scale (N = 128, K = 19, M = 1024, D = 256, float32, B = 2, 128^2 grid):
the Q = (N + 1) K = 2451 query slots' negative keys would be Q x M x D x 4 B = 2.6 GB
(kept for the backward pass). They are never materialised: the InfoNCE terms are
computed over chunks of `QUERY_CHUNK` = 128 query slots (`jax.lax.map`, rematerialised
in the backward pass), 128 x M x D x 4 B = 134 MB at a time. Compiled loss + gradient on
CPU (temporaries + arguments + outputs): 2.61 GiB when gathered at once, 0.34 GiB
chunked, of which 0.13 GiB are the three 32 MiB feature maps and the 32 MiB gradient;
per device on 8 devices (B = 16, G = 8) 0.32 GiB. Gradients reach the queries only.
MSE needs no negatives and draws none.

A class contributes only if it has query slots *and* a positive key ("present");
L_pull = sum_c w_c L_c / sum_c w_c over present classes, L_c the mean loss of its
queries (all groups'), w_c = 1 or, with dynamic re-weighting (DRW), (1 - conf_c)^s
normalised to mean 1 over present classes, conf_c the mean teacher confidence of target
pixels pseudo-labelled c (0 when there are none: such a class gets the largest weight)
[our reading of eq. 17-18, our choice for the empty case]. No present class: loss 0.

Ablation domains (paper Tab. 7). The loss takes whatever queries the step passes
(the pull term, `uda/t2s.py`, maps `pull.query_domain` to a student pass: 'pseudo_target' -> translated
source image with source labels; 'source' -> source image, source labels; 'target' ->
target image, teacher pseudo-labels). `key_domain` picks the
prototypes: 'source' -> teacher source features with source labels, 'target' -> teacher
target features with their pseudo-labels. Negatives are always drawn as above.

All label maps live on the stride-4 feature grid; `downsample_labels_nearest` brings
full-resolution maps there (nearest neighbour [our choice]). Labels outside [0, K)
(255 = ignore) are never candidates.
"""
from t2s_jax.uda.pulling.groups import GROUP_AXIS, pulling_loss
from t2s_jax.uda.pulling.loss import QUERY_CHUNK, class_sums, combine, drw_weights, infonce_losses, l2_normalize
from t2s_jax.uda.pulling.options import KEY_DOMAINS, LOSSES, PullOptions
from t2s_jax.uda.pulling.sampling import (
    NegativeSample,
    PullSamples,
    QuerySample,
    downsample_labels_nearest,
    draw_pull_samples,
    queries_per_class,
    query_budget,
    sample_negatives,
    sample_queries,
    unreliable_labels,
)

__all__ = [
    "GROUP_AXIS", "KEY_DOMAINS", "LOSSES", "QUERY_CHUNK", "NegativeSample", "PullOptions", "PullSamples",
    "QuerySample", "class_sums", "combine", "downsample_labels_nearest", "draw_pull_samples", "drw_weights",
    "infonce_losses", "l2_normalize", "pulling_loss",
    "queries_per_class", "query_budget", "sample_negatives", "sample_queries", "unreliable_labels",
]  # fmt: skip
