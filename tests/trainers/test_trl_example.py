"""TRL v0.11.4's sentiment example loop, run on rlfleet with only the import lines changed.

``SENTIMENT_EXAMPLE`` is TRL's ``examples/scripts/ppo.py`` loop (batched ``generate`` with
reference responses, ``log_stats`` with four columns) followed by the loop of its
``examples/notebooks/gpt2-sentiment.ipynb`` (one ``generate`` per query with a
``LengthSampler``, ``log_stats`` with the default columns), then ``save_pretrained``. The
``from trl ...`` lines read ``from rlfleet ...``; what needs the hub is local: the model is the
tiny GPT-2, the dataset a list of dicts built as TRL's ``build_dataset`` builds its rows, and the
sentiment pipeline a function with the pipeline's output format that scores with VADER.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

SENTIMENT_EXAMPLE = '''
import sys

import torch
from tqdm import tqdm
from transformers import AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlfleet import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, set_seed
from rlfleet.core import LengthSampler

model_dir, log_with, output_dir = sys.argv[1], sys.argv[2], sys.argv[3]
ppo_config = PPOConfig(
    model_name=model_dir,
    learning_rate=1e-3,
    batch_size=2,
    mini_batch_size=2,
    ppo_epochs=2,
    log_with=log_with,
)
sent_kwargs = {"return_all_scores": True, "function_to_apply": "none", "batch_size": 16}

tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
tokenizer.pad_token = tokenizer.eos_token

REVIEWS = [
    "the film was a quiet surprise and the cast carried every scene with ease",
    "i left halfway through because the plot made no sense at all",
    "a warm and funny story that my whole family enjoyed",
    "the acting was wooden and the music far too loud",
]


def build_dataset(input_min_text_length=2, input_max_text_length=8):
    input_size = LengthSampler(input_min_text_length, input_max_text_length)

    def tokenize(sample):
        sample["input_ids"] = torch.tensor(tokenizer.encode(sample["review"])[: input_size()])
        sample["query"] = tokenizer.decode(sample["input_ids"])
        return sample

    return [tokenize({"review": review}) for review in REVIEWS]


dataset = build_dataset()


def collator(data):
    return {key: [d[key] for d in data] for key in data[0]}


set_seed(ppo_config.seed)

ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(ppo_config.model_name)
model = AutoModelForCausalLMWithValueHead.from_pretrained(ppo_config.model_name)
tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
tokenizer.pad_token_id = tokenizer.eos_token_id

ppo_trainer = PPOTrainer(
    ppo_config, model, ref_model, tokenizer, dataset=dataset, data_collator=collator
)

device = ppo_trainer.accelerator.device
if ppo_trainer.accelerator.num_processes == 1:
    device = 0 if torch.cuda.is_available() else "cpu"  # to avoid a `pipeline` bug
ds_plugin = ppo_trainer.accelerator.state.deepspeed_plugin
if ds_plugin is not None and ds_plugin.is_zero3_init_enabled():
    raise RuntimeError("not reached: no DeepSpeed in one process")
vader = SentimentIntensityAnalyzer()


def sentiment_pipe(texts, **kwargs):
    """The pipeline's output format: NEGATIVE, then POSITIVE, per text."""
    scores = [vader.polarity_scores(text)["compound"] for text in texts]
    return [[{"label": "NEGATIVE", "score": -s}, {"label": "POSITIVE", "score": s}] for s in scores]


# examples/scripts/ppo.py
generation_kwargs = {
    "min_length": -1,
    "top_k": 0.0,
    "top_p": 1.0,
    "do_sample": True,
    "pad_token_id": tokenizer.eos_token_id,
    "max_new_tokens": 8,
}

for batch in tqdm(ppo_trainer.dataloader):
    query_tensors = batch["input_ids"]

    # Get response from gpt2
    response_tensors, ref_response_tensors = ppo_trainer.generate(
        query_tensors, return_prompt=False, generate_ref_response=True, **generation_kwargs
    )
    batch["response"] = tokenizer.batch_decode(response_tensors)
    batch["ref_response"] = tokenizer.batch_decode(ref_response_tensors)

    # Compute sentiment score
    texts = [q + r for q, r in zip(batch["query"], batch["response"])]
    pipe_outputs = sentiment_pipe(texts, **sent_kwargs)
    rewards = [torch.tensor(output[1]["score"]) for output in pipe_outputs]
    ref_texts = [q + r for q, r in zip(batch["query"], batch["ref_response"])]
    ref_pipe_outputs = sentiment_pipe(ref_texts, **sent_kwargs)
    ref_rewards = [torch.tensor(output[1]["score"]) for output in ref_pipe_outputs]
    batch["ref_rewards"] = ref_rewards

    # Run PPO step
    stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
    ppo_trainer.log_stats(
        stats, batch, rewards, columns_to_log=["query", "response", "ref_response", "ref_rewards"]
    )

# examples/notebooks/gpt2-sentiment.ipynb
output_min_length = 4
output_max_length = 8
output_length_sampler = LengthSampler(output_min_length, output_max_length)

generation_kwargs = {
    "min_length": -1,
    "top_k": 0.0,
    "top_p": 1.0,
    "do_sample": True,
    "pad_token_id": tokenizer.eos_token_id,
}

for epoch, batch in enumerate(tqdm(ppo_trainer.dataloader)):
    query_tensors = batch["input_ids"]

    #### Get response from gpt2
    response_tensors = []
    for query in query_tensors:
        gen_len = output_length_sampler()
        generation_kwargs["max_new_tokens"] = gen_len
        query_response = ppo_trainer.generate(query, **generation_kwargs).squeeze()
        response_len = len(query_response) - len(query)
        response_tensors.append(query_response[-response_len:])
    batch["response"] = [tokenizer.decode(r.squeeze()) for r in response_tensors]

    #### Compute sentiment score
    texts = [q + r for q, r in zip(batch["query"], batch["response"])]
    pipe_outputs = sentiment_pipe(texts, **sent_kwargs)
    positive_scores = [
        item["score"] for output in pipe_outputs for item in output if item["label"] == "POSITIVE"
    ]
    rewards = [torch.tensor(score) for score in positive_scores]

    #### Run PPO step
    stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
    ppo_trainer.log_stats(stats, batch, rewards)

ppo_trainer.save_pretrained(output_dir)
'''


def vader_score(text: str) -> float:
    return SentimentIntensityAnalyzer().polarity_scores(text)["compound"]


def test_trl_sentiment_example_runs_and_log_stats_keeps_a_record(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Run as ``python sentiment_example.py ...`` would, in this process (imports are paid)."""
    script = tmp_path / "sentiment_example.py"
    script.write_text(SENTIMENT_EXAMPLE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", [str(script), str(tiny_model_dir), "tensorboard", str(tmp_path / "saved")]
    )
    runpy.run_path(str(script), run_name="__main__")

    # exp_name defaults to the script's name, the logging dir to ./rlfleet_logs.
    run_dir = tmp_path / "rlfleet_logs" / "sentiment_example"
    lines = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    with_reference = ["query", "response", "ref_response", "ref_rewards", "reward"]
    columns = [line["game_log"]["columns"] for line in lines]
    assert columns == [with_reference] * 2 + [["query", "response", "reward"]] * 2
    for line in lines:
        rows = line["game_log"]["rows"]
        assert len(rows) == 2
        for query, response, *_, reward in rows:
            assert reward == pytest.approx(vader_score(query + response), abs=1e-6)
        rewards = [row[-1] for row in rows]
        assert line["env/reward_mean"] == pytest.approx(sum(rewards) / 2, abs=1e-6)
        for key in (
            "objective/kl",
            "ppo/loss/total",
            "ppo/mean_scores",
            "tokens/responses_len_mean",
        ):
            assert isinstance(line[key], float)
        assert line["ppo/mean_scores"] == pytest.approx(line["env/reward_mean"], abs=1e-6)
    for query, _, ref_response, ref_reward, _ in [
        r for x in lines[:2] for r in x["game_log"]["rows"]
    ]:
        assert ref_reward == pytest.approx(vader_score(query + ref_response), abs=1e-6)
    assert list(run_dir.glob("events.out.tfevents.*"))

    saved = tmp_path / "saved"
    assert AutoModelForCausalLM.from_pretrained(saved).config.n_layer == 2
    assert AutoTokenizer.from_pretrained(saved).eos_token is not None
