"""A model trained by two optimizers after one backward (Adam for the body, SGD with momentum
for a large head), or with ``--gan`` a GAN (two models, two optimizers, two backward passes),
for the capture tests of several optimizers; ``--critic N``: D steps N times per G step (a
WGAN's critic).

    python tests/data/train_two_optimizers.py [--steps 3] [--gan [--critic 1]]
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--gan", action="store_true")
parser.add_argument("--critic", type=int, default=1)
args = parser.parse_args()

torch.manual_seed(0)
if args.gan:
    gen = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 64))
    disc = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(args.steps):
        for _ in range(args.critic):
            real, z = torch.randn(32, 64), torch.randn(32, 16)
            opt_d.zero_grad()
            fake = gen(z)
            d_real, d_fake = disc(real), disc(fake.detach())
            (bce(d_real, torch.ones_like(d_real))
             + bce(d_fake, torch.zeros_like(d_fake))).backward()
            opt_d.step()
        opt_g.zero_grad()
        d_fake = disc(fake)
        bce(d_fake, torch.ones_like(d_fake)).backward()
        opt_g.step()
else:
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 4096))
    body = torch.optim.Adam(model[0].parameters(), lr=1e-3)
    head = torch.optim.SGD(model[2].parameters(), lr=1e-2, momentum=0.9)
    for _ in range(args.steps):
        x, y = torch.randn(16, 64), torch.randint(0, 4096, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        body.step()
        head.step()
        body.zero_grad()
        head.zero_grad()
