"""The response log-probabilities behind PPO's reported KL, against a hand computation on a tiny model."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.evaluation import response_logprobs

PAD = 0


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


def by_hand(model, prompt: list[int], response: list[int], temperature: float) -> float:
    """log p(response | prompt), one sequence alone (no padding): each response token's logit over the
    log of the sum of the exponentials at the position before it, at the temperature."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double() / temperature
    total = 0.0
    for k, token in enumerate(response):
        row = logits[len(prompt) + k - 1].tolist()
        total += row[token] - math.log(sum(math.exp(x) for x in row))
    return total


# prompts and responses of different lengths, so that the batch is padded
PAIRS = [([3, 5, 7], [2, 9]), ([4], [6, 6, 8, 1]), ([1, 2, 3, 4, 5], [10])]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_the_hand_computation(temperature):
    model = tiny_llama(0)
    got = response_logprobs(model, PAIRS, temperature, PAD, batch_size=2)  # one padded batch, then the rest
    want = [by_hand(model, p, r, temperature) for p, r in PAIRS]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(x < 0 for x in got)


def test_the_kl_of_sampled_responses_is_the_difference_of_the_two_models_log_probabilities():
    policy, reference = tiny_llama(0), tiny_llama(1)
    lp, ref_lp = (response_logprobs(m, PAIRS, 1.0, PAD) for m in (policy, reference))
    kl = [a - b for a, b in zip(lp, ref_lp)]  # the k1 estimate per response, as the PPO stage reports it
    want = [by_hand(policy, p, r, 1.0) - by_hand(reference, p, r, 1.0) for p, r in PAIRS]
    assert kl == pytest.approx(want, abs=1e-4)
    assert max(abs(x) for x in kl) > 0.01  # two different models do differ
