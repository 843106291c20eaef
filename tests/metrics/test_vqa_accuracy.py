"""VQAAccuracy: torchmetrics API, breakdowns, and exact reduction under DDP (2 gloo ranks)."""

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vlcompress.metrics import VQAAccuracy, answer_accuracy

PREDS = ["yes", "2", "red", "no", "cat", "blue"]
ANSWERS = [
    ["yes"] * 10,
    ["two"] * 4 + ["3"] * 6,
    ["red"] * 2 + ["blue"] * 8,
    ["yes"] * 10,
    ["cat"] * 3 + ["dog"] * 7,
    ["blue"] * 10,
]
ATYPES = ["yes/no", "number", "other", "yes/no", "other", "other"]
QTYPES = ["is the", "how many", "what color is", "is the", "what is", "what color is"]
VOCAB = ["yes", "no", "2", "3", "red", "blue", "cat", "dog"]


def expected_overall() -> float:
    return sum(answer_accuracy(p, a) for p, a in zip(PREDS, ANSWERS)) / len(PREDS)


def test_compute_and_breakdown():
    m = VQAAccuracy(question_types=sorted(set(QTYPES)))
    m.update(PREDS[:3], ANSWERS[:3], ATYPES[:3], QTYPES[:3])
    m.update(PREDS[3:], ANSWERS[3:], ATYPES[3:], QTYPES[3:])
    assert float(m.compute()) == pytest.approx(expected_overall())
    b = m.breakdown()
    assert b["questions"] == len(PREDS)
    assert b["answer_type"]["yes/no"] == pytest.approx(0.5)
    assert b["answer_type"]["number"] == pytest.approx(answer_accuracy("2", ANSWERS[1]))
    assert b["question_type"]["what color is"] == pytest.approx(
        (answer_accuracy("red", ANSWERS[2]) + 1.0) / 2
    )
    m.reset()
    assert float(m.compute()) == 0.0


def test_balanced_accuracy_exposes_blind_prior_answers():
    # per type, the test set answers "no" 9 times out of 10; a blind model answering "no"
    # scores 0.9 overall but 0.5 balanced (it is right on one answer of two); a model that
    # looks scores 1.0 on both
    answers = [["no"] * 10] * 9 + [["yes"] * 10]
    qtypes = ["is the"] * 10
    blind = VQAAccuracy(question_types=["is the"], answers=VOCAB)
    blind.update(["no"] * 10, answers, ["yes/no"] * 10, qtypes)
    assert float(blind.compute()) == pytest.approx(0.9)
    assert blind.breakdown()["balanced_accuracy"] == pytest.approx(0.5)
    seeing = VQAAccuracy(question_types=["is the"], answers=VOCAB)
    seeing.update(["no"] * 9 + ["yes"], answers, ["yes/no"] * 10, qtypes)
    assert seeing.breakdown()["balanced_accuracy"] == pytest.approx(1.0)
    # the mean over types of the mean over each type's majority answers
    m = VQAAccuracy(question_types=sorted(set(QTYPES)), answers=VOCAB)
    m.update(PREDS, ANSWERS, ATYPES, QTYPES)
    b = m.breakdown()
    # majority answers: "is the" yes (x2), "how many" 3, "what color is" blue (x2), "what is" dog
    per_type = {
        "is the": 0.5,
        "how many": answer_accuracy("2", ANSWERS[1]),
        "what color is": (answer_accuracy("red", ANSWERS[2]) + 1.0) / 2,
        "what is": answer_accuracy("cat", ANSWERS[4]),
    }
    assert b["balanced_question_type"] == pytest.approx(per_type)
    assert b["balanced_accuracy"] == pytest.approx(sum(per_type.values()) / 4)
    assert "balanced_accuracy" not in VQAAccuracy(question_types=["is the"]).breakdown()
    # the majority answer is taken after the official normalisation ("two" -> "2")
    m = VQAAccuracy(question_types=["how many"], answers=["2", "3"])
    m.update(["2"], [["two"] * 6 + ["3"] * 4], ["number"], ["how many"])
    assert m.breakdown()["balanced_accuracy"] == pytest.approx(1.0)


def test_bad_input_is_named():
    m = VQAAccuracy()
    with pytest.raises(ValueError, match="pair up"):
        m.update(["a", "b"], [["a"] * 10])
    with pytest.raises(ValueError, match="unknown answer_type 'colour'"):
        m.update(["a"], [["a"] * 10], answer_types=["colour"])


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = VQAAccuracy(question_types=sorted(set(QTYPES)), answers=VOCAB)
    idx = list(range(rank, len(PREDS), world))  # uneven split across ranks
    m.update(
        [PREDS[i] for i in idx],
        [ANSWERS[i] for i in idx],
        [ATYPES[i] for i in idx],
        [QTYPES[i] for i in idx],
    )
    queue.put((rank, float(m.compute()), m.breakdown()))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_reduction_matches_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = VQAAccuracy(question_types=sorted(set(QTYPES)), answers=VOCAB)
    single.update(PREDS, ANSWERS, ATYPES, QTYPES)
    assert "balanced_accuracy" in single.breakdown()
    for _, acc, breakdown in results:
        assert acc == pytest.approx(expected_overall())
        for kind, expected in single.breakdown().items():
            assert breakdown[kind] == pytest.approx(expected)
