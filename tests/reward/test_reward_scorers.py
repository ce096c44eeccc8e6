import time

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from rlfleet.common.config import RewardConfig
from rlfleet.reward.scorers import (
    FunctionScorer,
    RemoteScorer,
    RewardError,
    RewardModelScorer,
    RewardTimeoutError,
    make_scorer,
    metadata_columns,
)

PROMPTS = ["Review: ", "Review: the film", "Q: "]
RESPONSES = ["great acting and a lovely story", "was dull", "a"]


def test_metadata_columns_give_one_list_per_field_with_none_for_missing():
    rows = [{"answer": "4"}, {"answer": "5", "source": "x"}, {}]
    assert metadata_columns(rows) == {"answer": ["4", "5", None], "source": [None, "x", None]}


def test_function_scorer_passes_dataset_fields_and_config_kwargs(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:bonus_plus_weight", {"bonus": 10.0})
    scores = scorer.score(["a", "b"], ["x", "y"], [{"weight": 1.5}, {}])
    assert scores == [11.5, 10.0]


def test_function_scorer_exact_match_from_config():
    scorer = make_scorer(
        RewardConfig(
            function="rlfleet.reward.functions:exact_match", kwargs={"extract": "last_number"}
        )
    )
    scores = scorer.score(["", ""], ["it is 4", "it is 6"], [{"answer": 4}, {"answer": 5}])
    assert scores == [1.0, 0.0]


def test_function_scorer_accepts_numpy_scores(user_rewards):
    scores = FunctionScorer(f"{user_rewards}:numpy_lengths").score(PROMPTS, RESPONSES, [{}] * 3)
    assert scores == [31.0, 8.0, 1.0]
    assert all(type(score) is float for score in scores)


def test_dataset_field_clashing_with_config_kwarg_is_an_error_naming_it(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:bonus_plus_weight", {"bonus": 10.0})
    with pytest.raises(ValueError, match=r"dataset fields \['bonus'\] clash"):
        scorer.score(["a"], ["x"], [{"bonus": 1.0, "weight": 1.0}])


def test_function_scorer_bad_spec_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'rlfleet.reward.functions:missing'"):
        make_scorer(RewardConfig(function="rlfleet.reward.functions:missing"))


@pytest.mark.parametrize(
    ("function", "message", "indices"),
    [
        ("wrong_length", "returned 4 scores for 3 samples", ()),
        ("nan_at_1", "returned nan for sample 1", (1,)),
        ("text_at_2", "returned 'high' (str) for sample 2, not a number", (2,)),
        ("not_a_list", "returned a float, not a list of scores", ()),
        ("a_dict", "returned a dict, not a list of scores", ()),
    ],
)
def test_invalid_scores_name_the_sample_and_the_source(user_rewards, function, message, indices):
    scorer = FunctionScorer(f"{user_rewards}:{function}")
    with pytest.raises(RewardError, match=f"reward function '{user_rewards}:{function}'") as raised:
        scorer.score(PROMPTS, RESPONSES, [{}, {}, {}])
    assert message in str(raised.value)
    assert raised.value.indices == indices


def test_function_exception_names_the_first_failing_sample(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:fail_on_bad")
    with pytest.raises(RewardError, match="raised KeyError: 'cannot score bad one'") as raised:
        scorer.score(["", "", ""], ["fine", "bad one", "bad two"], [{}, {}, {}])
    assert raised.value.indices == (1,)


def test_failing_sample_is_found_with_the_batch_fields_some_samples_lack(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:weighted_fail_on_bad")
    with pytest.raises(RewardError, match="cannot score bad") as raised:
        scorer.score(["", "", ""], ["ok", "ok", "bad"], [{}, {"weight": 1.0}, {}])
    assert raised.value.indices == (2,)


def test_function_exception_on_the_batch_only_names_every_sample(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:fail_on_batches")
    with pytest.raises(RewardError, match="batches not supported") as raised:
        scorer.score(["", ""], ["a", "b"], [{}, {}])
    assert raised.value.indices == (0, 1)


def test_scorer_rejects_inputs_of_different_lengths():
    scorer = make_scorer(RewardConfig(function="rlfleet.reward.functions:sentiment"))
    with pytest.raises(ValueError, match="differ in length: 2, 1, 2"):
        scorer.score(["a", "b"], ["x"], [{}, {}])


def test_remote_scorer_posts_prompts_responses_metadata(reward_server):
    scorer = make_scorer(RewardConfig(url=f"{reward_server}/score", timeout_s=5))
    metadata = [{"bonus": 0.5}, {}, {"bonus": 2}]
    # the server's score: 100 * len(prompt) + len(response) + bonus
    assert scorer.score(PROMPTS, RESPONSES, metadata) == [831.5, 1608.0, 303.0]


def test_remote_scorer_timeout_names_url_and_limit(reward_server):
    scorer = RemoteScorer(f"{reward_server}/slow", timeout_s=0.2)
    with pytest.raises(
        RewardTimeoutError, match=f"'{reward_server}/slow' did not answer within 0.2 s"
    ):
        scorer.score(PROMPTS, RESPONSES, [{}, {}, {}])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/bad-json", "answered with invalid JSON: b'scores: [1, 2'"),
        ("/no-scores", "answered without a 'scores' key"),
        ("/short", "returned 2 scores for 3 samples"),
        ("/nan", "returned nan for sample 1"),
        ("/fail", "answered HTTP 500: b'internal failure'"),
    ],
)
def test_remote_scorer_bad_answers_name_the_url(reward_server, path, message):
    scorer = RemoteScorer(f"{reward_server}{path}", timeout_s=5)
    with pytest.raises(RewardError, match=f"reward url '{reward_server}{path}'") as raised:
        scorer.score(PROMPTS, RESPONSES, [{}, {}, {}])
    assert message in str(raised.value)


def test_remote_scorer_unreachable_names_the_url():
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/score"
    with pytest.raises(RewardError, match=f"reward url '{url}' is unreachable"):
        RemoteScorer(url, timeout_s=1).score(["a"], ["b"], [{}])


def test_url_scorer_rejects_kwargs():
    with pytest.raises(ValueError, match=r"reward.kwargs \['label'\] are not used by a reward url"):
        make_scorer(RewardConfig(url="http://127.0.0.1:1/score", kwargs={"label": 1}))


def build_classifier(tokenizer_dir, out_dir, id2label: dict[int, str], seed: int = 0):
    """A random-weight GPT-2 sequence classifier, saved in bfloat16 with the tiny tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=2,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )
    torch.manual_seed(seed)
    GPT2ForSequenceClassification(config).to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def sentiment_classifier(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("classifier")
    return str(build_classifier(tiny_model_dir, out_dir, {0: "NEGATIVE", 1: "POSITIVE"}))


def unpadded_logits(model_dir, texts):
    """Each text's logits from the model alone, one text per forward pass."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in texts]


def test_reward_model_scores_positive_logit_in_float32_batched(sentiment_classifier):
    scorer = make_scorer(RewardConfig(model=sentiment_classifier, kwargs={"batch_size": 2}))
    scores = scorer.score(PROMPTS, RESPONSES, [{}, {}, {}])
    assert scorer.model.dtype == torch.float32
    texts = [prompt + response for prompt, response in zip(PROMPTS, RESPONSES, strict=True)]
    expected = [logits[1].item() for logits in unpadded_logits(sentiment_classifier, texts)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3


@pytest.mark.parametrize("label", ["NEGATIVE", "negative", 0])
def test_reward_model_configured_label(sentiment_classifier, label):
    scorer = RewardModelScorer(sentiment_classifier, label=label)
    scores = scorer.score(["x "], ["bad"], [{}])
    assert scores == pytest.approx(
        [unpadded_logits(sentiment_classifier, ["x bad"])[0][0].item()], abs=1e-5
    )


def test_reward_model_unknown_label_lists_the_labels(sentiment_classifier):
    with pytest.raises(ValueError, match=r"no label 'neutral' among \['NEGATIVE', 'POSITIVE'\]"):
        RewardModelScorer(sentiment_classifier, label="neutral")


def test_reward_model_without_positive_label_asks_for_one(tiny_model_dir, tmp_path):
    model_dir = build_classifier(tiny_model_dir, tmp_path, {0: "a", 1: "b", 2: "c"})
    with pytest.raises(ValueError, match="set reward.kwargs.label"):
        RewardModelScorer(str(model_dir))


def test_reward_model_single_logit(tiny_model_dir, tmp_path):
    model_dir = str(build_classifier(tiny_model_dir, tmp_path, {0: "LABEL_0"}))
    scores = RewardModelScorer(model_dir).score(["a "], ["good"], [{}])
    assert scores == pytest.approx([unpadded_logits(model_dir, ["a good"])[0][0].item()], abs=1e-5)


def test_a_reward_function_that_hangs_is_cut_off_at_the_timeout(user_rewards):
    scorer = make_scorer(RewardConfig(function=f"{user_rewards}:hangs", timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"hangs' did not return within reward.timeout_s"):
        scorer.score(["p", "q"], ["a", "b"], [{}, {}])
    assert time.monotonic() - started < 5


def test_a_transient_503_is_retried(reward_server):
    scorer = make_scorer(RewardConfig(url=f"{reward_server}/flaky/{time.time_ns()}", timeout_s=5))
    assert scorer.score(["ab"], ["c"], [{}]) == [201.0]


def test_a_server_that_stays_unavailable_fails_within_the_timeout_naming_the_status(
    reward_server,
):
    scorer = make_scorer(RewardConfig(url=f"{reward_server}/always-503", timeout_s=1.0))
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"answered HTTP 503.*attempts in 1 s") as raised:
        scorer.score(["ab"], ["c"], [{}])
    assert not isinstance(raised.value, RewardTimeoutError)
    assert time.monotonic() - started < 3


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(reward_server):
    host = reward_server.removeprefix("http://")
    url = f"http://scorer:s3cret%20pass@{host}/auth?token=abc123"
    scorer = make_scorer(RewardConfig(url=url, timeout_s=5))
    assert scorer.score(["ab"], ["c"], [{}]) == [201.0]
    assert "s3cret" not in scorer.source and "abc123" not in scorer.source
    assert scorer.source == f"reward url 'http://***@{host}/auth?token=***'"
    wrong = make_scorer(RewardConfig(url=url.replace("s3cret", "guess"), timeout_s=5))
    with pytest.raises(RewardError, match="answered HTTP 401") as raised:
        wrong.score(["ab"], ["c"], [{}])
    assert "guess" not in str(raised.value) and "abc123" not in str(raised.value)
