import torch
from torch import nn
from pipeline import Problem
from trajectory_store import TrajectoryWriter

def make_mlp(hidden=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 1))

def waves(n=256):
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(1)) * 4 - 2
    return {"train": (x, torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:])}

if __name__ == "__main__":
    problem = Problem.define(model="own_loop:make_mlp", data="own_loop:waves", loss="mse")
    model, (x, y) = problem.build_model(), problem.build_data()["train"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrajectoryWriter.create("runs/own_loop.zarr", model, problem=problem) as writer:  # takes theta_0
        for idx in torch.randperm(256, generator=torch.Generator().manual_seed(2)).split(32):
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
            writer.record(model, loss=loss.item(), lr=0.1, batch_indices=idx)
