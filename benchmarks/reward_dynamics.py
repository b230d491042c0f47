"""Offline pilot for #25: does a reward that models the chunk's effect on the block rank chunks better?

Variants, all judged by the validation pick gain among the 4 chunks of a state (diffusion_policy/
reward_metrics.branch_pick_gain) on the rebuilt pipeline's reward data (split by episode 0.2, seed 0):

  direct  the shipped reward MLP: (obs window, chunk) -> reward_after
  aux     the same MLP with a second head that predicts the block keypoints' change over the
          executed steps (supervised on executed rows, whose next call's window shows the result)
  dyn     factored: f(obs window, chunk) -> keypoint change (learned from executed rows),
          g(keypoints) -> reward (learned from every state's reward_before and every executed
          row's reward_after); reward = g(keypoints now + f). Everything is learned from the
          collected rows; no simulator or goal geometry is used.

python -m benchmarks.reward_dynamics VARIANT EPOCHS [SEED]   (writes docs/pilots/reward_dynamics_<VARIANT>_seed<SEED>.json)
"""
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.reward_metrics import branch_pick_gain, regression_metrics, split_by_episode, within_state_metrics

torch.set_num_threads(1)
DATA = os.environ.get("REWARD_DATA", "data/reward/action_reward_data_300eps.npy")


def mlp(i, o, h=256, depth=2):
    layers, w = [], i
    for _ in range(depth):
        layers += [nn.Linear(w, h), nn.Mish()]
        w = h
    return nn.Sequential(*layers, nn.Linear(w, o))


def next_keypoints(cols):
    """For each executed row with a next call in its episode: the block keypoints after the chunk."""
    ep, call, br = cols["episode"].astype(np.int64), cols["call"].astype(np.int64), cols["branch"].astype(np.int64)
    key = {(e, c): i for i, (e, c, b) in enumerate(zip(ep, call, br)) if b == 0}
    has = np.zeros(len(ep), bool)
    nxt = np.zeros((len(ep), 18))
    for i, (e, c, b) in enumerate(zip(ep, call, br)):
        j = key.get((e, c + 1)) if b == 0 else None
        if j is not None:
            has[i] = True
            nxt[i] = cols["obs"][j, -1, :18]
    return has, nxt


def run(variant, epochs, seed=0):
    cols, meta = load_reward_data(DATA)
    is_train, is_val = split_by_episode(cols["episode"].astype(np.int64), 0.2, 0)
    has, nxt = next_keypoints(cols)
    obs = torch.as_tensor(cols["obs"], dtype=torch.float32)
    act = torch.as_tensor(cols["action_pred"], dtype=torch.float32)
    y = torch.as_tensor(cols["reward_after"], dtype=torch.float32)
    y0 = torch.as_tensor(cols["reward_before"], dtype=torch.float32)
    kp_now = obs[:, -1, :18]
    dkp = (torch.as_tensor(nxt, dtype=torch.float32) - kp_now) / 10.0  # pixels / 10
    tr, va = np.flatnonzero(is_train), np.flatnonzero(is_val)
    lo_o, hi_o = obs[tr].flatten(0, 1).min(0).values, obs[tr].flatten(0, 1).max(0).values
    lo_a, hi_a = act[tr].flatten(0, 1).min(0).values, act[tr].flatten(0, 1).max(0).values
    x = torch.cat([(2 * (obs - lo_o) / (hi_o - lo_o) - 1).flatten(1), (2 * (act - lo_a) / (hi_a - lo_a) - 1).flatten(1)], 1)
    lo_k, hi_k = lo_o[:18], hi_o[:18]
    kn = lambda k: 2 * (k - lo_k) / (hi_k - lo_k) - 1  # noqa: E731
    mean, std = y[tr].mean(), y[tr].std()
    torch.manual_seed(seed)
    if variant == "dyn":
        f, g = mlp(x.shape[1], 18), mlp(18, 1)
        params = list(f.parameters()) + list(g.parameters())
    else:
        f, g = mlp(x.shape[1], 1 + (18 if variant == "aux" else 0)), None
        params = list(f.parameters())
    has_t = torch.from_numpy(has)
    # g's extra supervision: every state's keypoints now -> reward_before (states of train episodes)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-6)
    bs = 256
    steps = int(np.ceil(len(tr) / bs))
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    trt = torch.from_numpy(tr)
    states = (cols["episode"] * 100000 + cols["call"]).astype(np.int64)[va]

    def predict(idx):
        if variant == "dyn":
            return g(kn(kp_now[idx] + 10.0 * f(x[idx]))).squeeze(-1)
        return f(x[idx])[:, 0]

    t0, log = time.time(), []
    for ep in range(epochs):
        perm = trt[torch.randperm(len(trt))]
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            h = has_t[idx]
            if variant == "dyn":
                d = f(x[idx])
                # g on true states (now, and after executed chunks), f on executed transitions, and the
                # composition on every row (branches too): the reward after the chunk
                loss = (nn.functional.mse_loss(g(kn(kp_now[idx])).squeeze(-1), (y0[idx] - mean) / std)
                        + nn.functional.mse_loss(g(kn(kp_now[idx] + 10.0 * d)).squeeze(-1), (y[idx] - mean) / std))
                if h.any():
                    loss = loss + nn.functional.mse_loss(d[h], dkp[idx][h]) * 10.0 \
                        + nn.functional.mse_loss(g(kn(kp_now[idx][h] + 10.0 * dkp[idx][h])).squeeze(-1),
                                                 (y[idx][h] - mean) / std)
            else:
                out = f(x[idx])
                loss = nn.functional.mse_loss(out[:, 0], (y[idx] - mean) / std)
                if variant == "aux" and h.any():
                    loss = loss + nn.functional.mse_loss(out[h, 1:], dkp[idx][h]) * 10.0
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
        if (ep + 1) % 10 == 0 or ep + 1 == epochs:
            with torch.no_grad():
                p = (predict(torch.from_numpy(va)) * std + mean).numpy()
            m = regression_metrics(p, y[va].numpy())
            m["pick_gain"] = branch_pick_gain(p, y[va].numpy(), states)
            m.update(within_state_metrics(p, y[va].numpy(), states, 0.95 * y0[va].numpy()))
            m.update(epoch=ep + 1, s=round(time.time() - t0), variant=variant, seed=seed)
            print(json.dumps(m), flush=True)
            log.append(m)
    np.save(f"data/reward_dyn_{variant}_seed{seed}_val.npy", p)
    return log


if __name__ == "__main__":
    out = run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    path = f"docs/pilots/reward_dynamics_{sys.argv[1]}_seed{sys.argv[3] if len(sys.argv) > 3 else 0}.json"
    with open(path, "w") as fh:
        json.dump({"data": DATA, "command": " ".join(["python"] + sys.argv), "rows": out}, fh, indent=1)
