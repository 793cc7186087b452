"""A user's own checkpoint folder that is not what the model needs: each case
fails with a message naming the file and what is wrong, never a bare torch
error and never a silently different model."""
import json
import os
import shutil

import pytest
import torch.multiprocessing as tmp

from workers.model import PRESETS, ModelArgs

ARGS = ModelArgs.from_dict({**PRESETS["llama-tiny"].to_dict(), "n_kv_heads": 4})


def _worker(rank: int, folder: str, out: str) -> None:
    """In a spawned process (model parallel is process-global): build the bad
    folders, try each, write what each raised."""
    from workers import dist as wdist
    from workers.dist import _free_port
    from workers.model import build_model, save_checkpoint

    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    wdist._from_submitit = lambda: None
    wdist.init_distributed(1)
    try:
        def build(args, weights):
            return build_model(args, weights=weights, dtype="float32", device="cpu", seed=3, max_batch_size=1,
                               max_seq_len=16)

        save_checkpoint(build(ARGS, "random"), os.path.join(folder, "ok"), n_files=2)
        deeper = ModelArgs.from_dict({**ARGS.to_dict(), "n_layers": ARGS.n_layers + 2})
        save_checkpoint(build(deeper, "random"), os.path.join(folder, "deeper"), n_files=1)
        os.remove(os.path.join(folder, "deeper", "params.json"))  # nothing says it is deeper
        cases = {}
        for name in ("badjson", "gap", "trunc", "vocab"):
            shutil.copytree(os.path.join(folder, "ok"), os.path.join(folder, name))
        with open(os.path.join(folder, "badjson", "params.json"), "w") as f:
            f.write('{"dim": 64, oops}')
        os.rename(os.path.join(folder, "gap", "consolidated.01.pth"), os.path.join(folder, "gap", "consolidated.02.pth"))
        path = os.path.join(folder, "trunc", "consolidated.01.pth")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        params = json.load(open(os.path.join(folder, "vocab", "params.json")))
        params["vocab_size"] = 100
        json.dump(params, open(os.path.join(folder, "vocab", "params.json"), "w"))
        for name in ("deeper", "badjson", "gap", "trunc", "vocab", "ok"):
            try:
                build(ARGS, os.path.join(folder, name))
                cases[name] = None
            except Exception as e:  # noqa: BLE001 - the message is what is tested
                cases[name] = f"{type(e).__name__}: {e}"
        json.dump(cases, open(out, "w"))
    finally:
        wdist.shutdown()


@pytest.mark.slow
def test_bad_checkpoint_folders_name_the_file_and_the_problem(tmp_path):
    out = tmp_path / "cases.json"
    tmp.spawn(_worker, args=(str(tmp_path), str(out)), nprocs=1)
    cases = json.loads(out.read_text())
    assert cases["ok"] is None
    assert "deeper/consolidated.00.pth holds" in cases["deeper"] and "has no place for" in cases["deeper"]
    assert "badjson/params.json is not valid JSON" in cases["badjson"]
    assert "gap has 2 consolidated files but not consolidated.01.pth" in cases["gap"]
    assert "cannot read checkpoint file" in cases["trunc"] and "trunc/consolidated.01.pth" in cases["trunc"]
    assert "tok_embeddings.weight is" in cases["vocab"] and "does not match the tensors" in cases["vocab"]
