"""Offline pilot for #25: within-state pick gain of reward MLPs with raw vs block-frame features.

Usage:
    python -m benchmarks.reward_features VARIANT EPOCHS [SEED]   (reads data/reward/action_reward_data_300eps.npy)
"""
import json, sys, time
import numpy as np, torch
from diffusion_policy.reward_data import load_reward_data
from diffusion_policy.env.geometry import KEYPOINTS_LOCAL, GOAL_POSE
from diffusion_policy.reward_metrics import split_by_episode, branch_pick_gain, regression_metrics

torch.set_num_threads(1)
K = torch.tensor(KEYPOINTS_LOCAL, dtype=torch.float32)

def block_frame(obs, act):
    """obs (B, 2, 20) raw, act (B, 16, 2) raw -> features."""
    kp = obs[:, :, :18].reshape(obs.shape[0], 2, 9, 2)
    agent = obs[:, :, 18:20]
    Kc = K - K.mean(0)
    Wm = kp.mean(2)                       # (B, 2, 2)
    Wc = kp - Wm[:, :, None]
    H = torch.einsum("ki,btkj->btij", Kc, Wc)  # (B, 2, 2, 2)
    theta = torch.atan2(H[..., 0, 1] - H[..., 1, 0], H[..., 0, 0] + H[..., 1, 1])  # (B, 2)
    c, s = torch.cos(theta), torch.sin(theta)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2, 2) world = R local
    t = Wm - torch.einsum("btij,j->bti", R, K.mean(0))
    Rn, tn = R[:, -1], t[:, -1]
    def local(p):  # (B, N, 2) world -> block frame (last obs)
        return torch.einsum("bji,bnj->bni", Rn, p - tn[:, None])
    f_act = local(act) / 100.0
    f_agent = local(agent) / 100.0
    g = torch.tensor(GOAL_POSE[:2])
    dth = theta[:, -1] - GOAL_POSE[2]
    pose = torch.cat([(tn - g) / 100.0, torch.stack([torch.cos(dth), torch.sin(dth)], -1),
                      (t[:, -1] - t[:, 0]) / 10.0, torch.stack([torch.sin(theta[:, -1] - theta[:, 0]) * 10], -1)], -1)
    return torch.cat([f_act.flatten(1), f_agent.flatten(1), pose], -1)

def run(variant, epochs, seed=0):
    cols, meta = load_reward_data("data/reward/action_reward_data_300eps.npy")
    target = "reward_after"
    is_train, is_val = split_by_episode(cols["episode"].astype(np.int64), 0.2, 0)
    obs = torch.as_tensor(cols["obs"], dtype=torch.float32)
    act = torch.as_tensor(cols["action_pred"], dtype=torch.float32)
    y = torch.as_tensor(cols[target], dtype=torch.float32)
    tr, va = np.flatnonzero(is_train), np.flatnonzero(is_val)
    lo_o, hi_o = obs[tr].flatten(0, 1).min(0).values, obs[tr].flatten(0, 1).max(0).values
    lo_a, hi_a = act[tr].flatten(0, 1).min(0).values, act[tr].flatten(0, 1).max(0).values
    raw = torch.cat([(2 * (obs - lo_o) / (hi_o - lo_o) - 1).flatten(1), (2 * (act - lo_a) / (hi_a - lo_a) - 1).flatten(1)], 1)
    x = raw if variant == "raw" else torch.cat([raw, block_frame(obs, act)], 1)
    mean, std = y[tr].mean(), y[tr].std()
    ys = (y - mean) / std
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.Mish(), torch.nn.Linear(256, 256), torch.nn.Mish(), torch.nn.Linear(256, 1))
    bs = 256
    steps = int(np.ceil(len(tr) / bs))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2 if variant == "raw" else 3e-3, weight_decay=1e-6)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    trt = torch.from_numpy(tr)
    states = (cols["episode"] * 100000 + cols["call"]).astype(np.int64)[va]
    t0 = time.time()
    for ep in range(epochs):
        perm = trt[torch.randperm(len(trt))]
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            loss = torch.nn.functional.mse_loss(net(x[idx]).squeeze(-1), ys[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
        if (ep + 1) % 10 == 0 or ep + 1 == epochs:
            with torch.no_grad():
                p = (net(x[va]).squeeze(-1) * std + mean).numpy()
            m = regression_metrics(p, y[va].numpy()); m["pick_gain"] = branch_pick_gain(p, y[va].numpy(), states)
            m["epoch"] = ep + 1; m["s"] = round(time.time() - t0)
            print(variant, json.dumps(m), flush=True)
    np.save(f"data/reward_features_{variant}_seed{seed}_val.npy", p)
    return net

if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
