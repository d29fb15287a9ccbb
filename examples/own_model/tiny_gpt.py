import os
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from pipeline import Problem
from pipeline.callbacks.hf import TrajectoryCallback

def make_model(width=16, layers=2):  # tied embeddings, LayerNorm, dropout; from a config, no download
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
                                      bos_token_id=0, eos_token_id=0))

def text_splits(path, block=32, blocks=32):  # byte tokens; the first 4 labels of a block are ignored (-100)
    ids = torch.tensor(list(open(path, "rb").read(block * blocks))).reshape(blocks, block)
    return {"train": {"input_ids": ids, "labels": torch.where(torch.arange(block) < 4, -100, ids)}}

if __name__ == "__main__":
    problem = Problem.define(model="tiny_gpt:make_model", loss="token-cross-entropy",
                             data={"factory": "tiny_gpt:text_splits", "kwargs": {"path": os.__file__}})
    data = problem.build_data()["train"]
    args = TrainingArguments("runs/tiny_gpt", max_steps=8, per_device_train_batch_size=8, save_strategy="no")
    Trainer(problem.build_model(), args, train_dataset=[{k: v[i] for k, v in data.items()} for i in range(32)],
            callbacks=[TrajectoryCallback("runs/tiny_gpt.zarr", problem=problem)]).train()
