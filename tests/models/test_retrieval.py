"""Recall@K: a hand-worked example, key deduplication, chunking, and the torchmetrics wrapper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.components.retrieval import RetrievalRecall, first_occurrence, recall_at_k


def _at(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in 2-D: cosine similarity is decreasing in the angle between them."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


# Four images, two captions each; group = image id. Angles in degrees.
IMAGES = _at([0, 90, 180, 270])
IMAGE_IDS = torch.tensor([0, 1, 2, 3])
CAPTIONS = _at([10, 175, 80, 230, 165, 250, 140, 40])
CAPTION_GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
CAPTION_KEYS = torch.tensor([100, 101, 102, 103, 104, 105, 106, 107])

# Image -> text, captions ranked by angular distance (caption:group@distance):
#   I0 @0:   c0:0@10  c7:3@40 ...                            first own caption at rank 1
#   I1 @90:  c2:1@10 ...                                      rank 1
#   I2 @180: c1:0@5   c4:2@15 ...                             rank 2
#   I3 @270: c5:2@20 c3:1@40 c1:0@95 c0:0@100 c4:2@105 c6:3@130 c7:3@130   rank 6
# -> R@1 = 2/4, R@2 = 3/4, R@5 = 3/4.
EXPECTED_I2T = {1: 0.5, 2: 0.75, 5: 0.75}
# Text -> image, images ranked by angular distance:
#   c0 @10 (g0):  I0 first                      rank 1
#   c1 @175 (g0): I2@5  I1@85  I3@95  I0@175    rank 4
#   c2 @80 (g1):  I1 first                      rank 1
#   c3 @230 (g1): I3@40 I2@50  I0@130 I1@140    rank 4
#   c4 @165 (g2): I2 first                      rank 1
#   c5 @250 (g2): I3@20 I2@70                   rank 2
#   c6 @140 (g3): I2@40 I1@50  I3@130           rank 3
#   c7 @40 (g3):  I0@40 I1@50  I3@130           rank 3
# -> R@1 = 3/8, R@2 = 4/8, R@5 = 8/8 (only 4 images, so K=5 counts as K=4).
EXPECTED_T2I = {1: 3 / 8, 2: 4 / 8, 5: 1.0}
KS = (1, 2, 5)


def test_hand_computed_example():
    assert recall_at_k(IMAGES, CAPTIONS, IMAGE_IDS, CAPTION_GROUPS, ks=KS) == pytest.approx(EXPECTED_I2T)
    assert recall_at_k(CAPTIONS, IMAGES, CAPTION_GROUPS, IMAGE_IDS, ks=KS) == pytest.approx(EXPECTED_T2I)


def test_unnormalised_inputs_use_cosine():
    scaled = IMAGES * torch.tensor([[1.0], [7.0], [0.1], [3.0]])
    assert recall_at_k(scaled, CAPTIONS, IMAGE_IDS, CAPTION_GROUPS, ks=KS) == pytest.approx(EXPECTED_I2T)


def test_identical_transcripts_count_as_matches():
    # Speech: utterances 0 and 1 say the same text (transcript group 5); utterance 0 sits closest to the
    # transcript row of utterance 1, which is still a hit because the groups are equal.
    utts = _at([0, 60, 180])
    transcripts = _at([55, 10, 170])
    groups = torch.tensor([5, 5, 9])
    assert recall_at_k(utts, transcripts, groups, groups, ks=(1,)) == {1: 1.0}
    # With distinct groups utterance 0 and utterance 1 would both miss at R@1.
    distinct = torch.tensor([5, 6, 9])
    assert recall_at_k(utts, transcripts, distinct, distinct, ks=(1,)) == pytest.approx({1: 1 / 3})


def _full_matrix_recall(query, gallery, qg, gg, ks):
    order = (query @ gallery.T).argsort(dim=1, descending=True)
    match = gg[order] == qg[:, None]
    return {k: match[:, :k].any(dim=1).float().mean().item() for k in ks}


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(37, 16, generator=gen), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(53, 16, generator=gen), dim=1)
    qg = torch.randint(0, 10, (37,), generator=gen)
    gg = torch.randint(0, 10, (53,), generator=gen)
    ks = (1, 5, 10)
    whole = recall_at_k(query, gallery, qg, gg, ks=ks, chunk_size=1000)
    assert recall_at_k(query, gallery, qg, gg, ks=ks, chunk_size=5) == whole
    assert recall_at_k(query, gallery, qg, gg, ks=ks, chunk_size=1) == whole
    assert whole == pytest.approx(_full_matrix_recall(query, gallery, qg, gg, ks))
    assert 0 < whole[1] < whole[10] < 1  # not a degenerate case


def test_first_occurrence():
    keys = torch.tensor([7, 3, 7, 9, 3, 3])
    assert first_occurrence(keys).tolist() == [1, 0, 3]  # keys 3, 7, 9


def _coco_batches():
    """Batches as a COCO val loop sees them: one row per caption, the image repeated for each of its captions,
    and the last batch padded by DistributedSampler with a repeat of the first sample."""
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0])
    batches = []
    for chunk in rows.split(4):
        img = CAPTION_GROUPS[chunk]
        batches.append(
            (IMAGES[img], IMAGE_IDS[img], IMAGE_IDS[img], CAPTIONS[chunk], CAPTION_KEYS[chunk], img)
        )
    return batches


def _named(expected_a2b, expected_b2a, prefix_a2b="a2b", prefix_b2a="b2a"):
    out = {f"{prefix_a2b}_R@{k}": v for k, v in expected_a2b.items()}
    out.update({f"{prefix_b2a}_R@{k}": v for k, v in expected_b2a.items()})
    return out


def test_metric_deduplicates_and_names():
    metric = RetrievalRecall(prefix_a2b="i2t", prefix_b2a="t2i", ks=KS)
    for batch in _coco_batches():
        metric.update(*batch)
    result = {k: v.item() for k, v in metric.compute().items()}
    assert result == pytest.approx(_named(EXPECTED_I2T, EXPECTED_T2I, "i2t", "t2i"))

    # Without deduplication the repeated images would crowd the text->image ranking: c1's own image I0 would
    # sit behind two copies each of I2, I1 and I3 (rank 7), so R@5 drops below 1.
    rows = torch.cat([b[0] for b in _coco_batches()])
    ids = torch.cat([b[1] for b in _coco_batches()])
    caps = torch.cat([b[3] for b in _coco_batches()])
    groups = torch.cat([b[5] for b in _coco_batches()])
    assert recall_at_k(caps, rows, groups, ids, ks=KS) != pytest.approx(EXPECTED_T2I)

    metric.reset()
    metric.update(*_coco_batches()[0])
    # Only c0-c3 and I0, I1 left: I0's nearest caption is c0, I1's is c2, both their own.
    assert metric.compute()["i2t_R@1"].item() == 1.0


def _metric_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metric = RetrievalRecall(ks=KS)
    batches = _coco_batches()  # 3 batches of 4, 4, 1 rows: uneven state sizes across ranks
    for batch in batches[rank::2]:
        metric.update(*batch)
    result = {k: v.item() for k, v in metric.compute().items()}
    if rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # ~20 s on 2 shared cores, nearly all of it importing torchmetrics in the two children
def test_metric_syncs_across_two_ranks(tmp_path):
    out_file = str(tmp_path / "result.pt")
    mp.spawn(_metric_worker, args=(str(tmp_path / "init"), out_file), nprocs=2, join=True)
    assert torch.load(out_file) == pytest.approx(_named(EXPECTED_I2T, EXPECTED_T2I))
