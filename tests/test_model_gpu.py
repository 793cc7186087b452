"""Generation on a CUDA card: the graph-replayed decode gives the eager tokens."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from workers.dist import init_distributed, shutdown  # noqa: E402
from workers.model import PRESETS, Generator, build_model, forward_full  # noqa: E402


@pytest.fixture(scope="module")
def model():
    init_distributed(1)
    m = build_model(PRESETS["llama-tiny"], weights="random", dtype="float32", device="cuda:0", seed=3,
                    max_batch_size=4, max_seq_len=300)
    yield m
    shutdown()


def test_graph_decode_matches_eager_and_full_forward(model):
    prompts = [[1, 7, 8, 9, 10], [1, 42], [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]
    graph = Generator(model, max_batch_size=4, max_seq_len=300, device="cuda:0", cuda_graph=True)
    eager = Generator(model, max_batch_size=4, max_seq_len=300, device="cuda:0", cuda_graph=False)
    out_g = graph.generate(prompts, max_new_tokens=200, eos_id=None)  # crosses the 128-key bucket
    out_e = eager.generate(prompts, max_new_tokens=200, eos_id=None)
    assert graph.use_graph and len(graph._graphs) >= 2
    assert out_g == out_e and all(len(o) == 200 for o in out_g)
    seq = list(prompts[1])
    for _ in range(20):
        seq.append(int(forward_full(model, torch.tensor([seq]))[0, -1].argmax()))
    assert out_g[1][:20] == seq[2:]
