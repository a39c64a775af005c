"""The inference pipeline with a scripted generator: structure, voting and token accounting."""
from __future__ import annotations

from fakes import EchoTask, completion

from spiral_cli.evaluate import summarize
from spiral_cli.pipeline import PipelineConfig, draw_subsets, run_pipeline, vote_key


class ScriptedGenerator:
    """Search prompts get the scripted answers in turn; an aggregation prompt answers with the
    majority of the candidates it was shown (a perfect 'majority aggregator')."""

    def __init__(self, search_answers: dict[str, list[str]]):
        self.search_answers = search_answers
        self.calls = []
        self.temperatures = []

    def generate(self, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop=None, seed=None):
        self.calls.append((len(prompts), n, max_new_tokens))
        self.temperatures.append((prompts[0][0], temperature))  # 'S' search, 'A' aggregation
        out = []
        for prompt in prompts:
            pid = prompt.split("\n")[0].split()[1]
            if prompt.startswith("S "):
                texts = [f"answer: {a}" for a in self.search_answers[pid][:n]]
            else:
                cands = [l[1:] for l in prompt.splitlines()[1:]]
                answers = [c.split("answer:")[-1].strip() for c in cands]
                best = max(answers, key=answers.count)
                texts = [f"checked\nanswer: {best}"] * n
            out.append([completion(t, prompt) for t in texts])
        return out

    def update_weights(self, model):
        pass


PROBLEMS = [{"id": "p1", "target": "7"}, {"id": "p2", "target": "5"}]
ANSWERS = {"p1": ["7", "3", "7", "7"], "p2": ["1", "2", "2", "5"]}


def test_majority_without_aggregator_and_token_accounting():
    gen = ScriptedGenerator(ANSWERS)
    cfg = PipelineConfig(parallel=4, seq_budget=16, agg_rounds=0, aggregate="majority")
    r1, r2 = run_pipeline(EchoTask(), gen, PROBLEMS, cfg)
    assert gen.calls == [(2, 4, 16)]  # one batched call, n samples per prompt
    assert r1.answer == "7" and r1.correct is True
    assert r2.answer == "2" and r2.correct is False
    s1 = r1.summary()
    assert s1 == {"trace_accuracy": 0.75, "any_correct": True, "majority_correct": True}
    assert r2.summary()["trace_accuracy"] == 0.25 and r2.summary()["any_correct"] is True
    # prompt "S p1\n" is 5 chars -> 5 tokens per sample; each completion "answer: X" is 9 tokens
    assert r1.tokens["search"].to_dict() == {"prompt": 20, "generated": 36, "total": 56}
    assert r1.tokens["aggregate"].total == 0
    d = r1.to_dict(include_traces=True)
    assert d["tokens"]["total"] == {"prompt": 20, "generated": 36, "total": 56}
    assert len(d["traces"]) == 4 and d["aggregations"] == []


def test_rsa_rounds_population_and_tokens():
    gen = ScriptedGenerator(ANSWERS)
    cfg = PipelineConfig(parallel=4, seq_budget=16, agg_rounds=2, population=3, agg_set_size=4, aggregate="learned")
    r1, r2 = run_pipeline(EchoTask(), gen, PROBLEMS, cfg)
    assert [c[:2] for c in gen.calls] == [(2, 4), (6, 1), (6, 1)]  # P=3 per problem per round
    assert len(r1.rounds) == 2 and all(len(pop) == 3 for pop in r1.rounds)
    assert r1.answer == "7" and r1.correct is True
    assert r1.summary()["aggregation_accuracy"] == 1.0
    agg = r1.tokens["aggregate"]
    # every aggregation completion is "checked\nanswer: 7" = 17 tokens; 3 per round, 2 rounds
    assert agg.generated == 17 * 6
    assert r1.token_totals().total == r1.tokens["search"].total + agg.total


def test_aggregation_samples_at_agg_temperature_and_search_at_temperature():
    for agg_temperature, expected in [(None, 0.7), (0.0, 0.0), (1.3, 1.3)]:
        gen = ScriptedGenerator(ANSWERS)
        cfg = PipelineConfig(parallel=4, seq_budget=16, agg_rounds=2, population=3, agg_set_size=2,
                             temperature=0.7, agg_temperature=agg_temperature)
        run_pipeline(EchoTask(), gen, PROBLEMS, cfg)
        assert gen.temperatures == [("S", 0.7), ("A", expected), ("A", expected)]


def test_infer_and_the_stages_evaluation_take_agg_temperature_from_the_recipe():
    from spiral_cli.evaluate import evaluate_recipe
    from spiral_cli.infer import pipeline_config
    from spiral_cli.recipe import Recipe

    recipe = Recipe.model_validate({"name": "t", "generation": {"temperature": 0.9, "agg_temperature": 0.2},
                                    "infer": {"parallel": 4, "population": 2, "agg_set_size": 2}})
    cfg = pipeline_config(recipe)
    assert (cfg.temperature, cfg.agg_temperature) == (0.9, 0.2)
    gen = ScriptedGenerator(ANSWERS)
    evaluate_recipe(EchoTask(), gen, PROBLEMS, recipe)
    assert gen.temperatures == [("S", 0.9), ("A", 0.2)]
    unset = Recipe.model_validate({"name": "t", "generation": {"temperature": 0.9}})
    assert pipeline_config(unset).agg_temperature is None  # aggregations at `temperature`


def test_aggregate_none_takes_one_trace():
    gen = ScriptedGenerator(ANSWERS)
    cfg = PipelineConfig(parallel=4, agg_rounds=3, aggregate="none")
    r1, r2 = run_pipeline(EchoTask(), gen, PROBLEMS, cfg)
    assert len(gen.calls) == 1 and r1.rounds == []
    assert r1.answer == "7" and r2.answer == "1" and r2.correct is False


def test_summarize_over_problems():
    gen = ScriptedGenerator(ANSWERS)
    cfg = PipelineConfig(parallel=4, agg_rounds=1, population=2, aggregate="learned")
    m = summarize(run_pipeline(EchoTask(), gen, PROBLEMS, cfg))
    assert m["pass@1"] == (0.75 + 0.25) / 2
    assert m["pass@4"] == 1.0
    assert m["majority@4"] == 0.5


def test_subsets_and_vote_key():
    import random

    subsets = draw_subsets(8, 4, 5, random.Random(0))
    assert len(subsets) == 5 and all(len(set(s)) == 4 and max(s) < 8 for s in subsets)
    assert draw_subsets(2, 4, 1, random.Random(0))[0] in ([0, 1], [1, 0])
    assert vote_key(" (1 + 2) * 3 ") == "(1+2)*3" and vote_key(None) is None


def test_named_candidates_are_resolved_before_scoring_and_the_next_round():
    """countdown with agg_answer=select: an aggregation that names a candidate ("answer: #1") is
    scored, voted and passed to the next RSA round as that candidate's answer."""
    from spiral_cli.tasks.countdown import CountdownConfig, CountdownTask

    task = CountdownTask(CountdownConfig(agg_view="grouped", agg_answer="select"))
    p = {"id": "p", "numbers": [3, 7, 12, 25], "target": 70}

    class NamesFirst:
        def __init__(self):
            self.prompts = []

        def generate(self, prompts, *, n=1, **kw):
            self.prompts += prompts
            search = ["answer: 25*3-12+7\n", "fail\n", "fail\n"]
            return [[completion("1: x ok\nanswer: #1\n" if pr.startswith("agg") else search[i], pr)
                     for i in range(n)] for pr in prompts]

        def update_weights(self, model):
            pass

    gen = NamesFirst()
    cfg = PipelineConfig(parallel=3, seq_budget=16, agg_rounds=2, population=2, agg_set_size=3, aggregate="learned")
    (r,) = run_pipeline(task, gen, [p], cfg)
    # search: one right answer, two without; the grouped prompt numbers the right one 1
    assert [t.answer for t in r.search] == ["25*3-12+7", None, None]
    assert all(t.answer == "25*3-12+7" and t.correct for pop in r.rounds for t in pop)
    assert r.answer == "25*3-12+7" and r.correct
    # round 2 saw round 1's resolved answers, two votes for the one answer
    assert gen.prompts[-1] == "agg 3 7 12 25 -> 70\n1: 2x 25*3-12+7\n--\n"
