#!/usr/bin/env python3
"""Labelled traffic for evaluating prompt-radar: organic users (with the confounders that fool naive
detectors) interleaved with capability-harvesting campaigns (with evasions), over a few days.

    python3 eval/make_traffic.py --seed 1 --out eval/sets/dev-seed1.jsonl [--scale 1.0]

One JSON object a line, sorted by time:
    {"account_id", "prompt", "timestamp_ms", "label": "organic" | "camp-…", "kind", "template"}
`label` is the account's label (a campaign account's cover traffic carries the campaign name);
`kind` (organic, popular, app, batch, campaign, cover) and `template` say how the prompt was made and
are for analysis only (traffic readers ignore extra fields). Python 3.11 standard library only;
reads nothing but eval/data/. Deterministic per (seed, scale). See eval/README.md.
"""

import argparse
import gzip
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path


DATA = Path(__file__).resolve().parent / "data"
EPOCH_MS = 1_748_822_400_000  # 2025-06-02T00:00:00Z
DAY_MS = 86_400_000
DAYS = 4
SPAN_MS = DAYS * DAY_MS

# Organic population at scale 1.
ORGANIC_ACCOUNTS = 1250
APP_ACCOUNTS = 200
POPULAR_ACTIVITY_EXP = 0.8
# Local-time activity by hour (organic users sleep; campaigns do not).
HOUR_WEIGHTS = [.3, .2, .15, .1, .1, .15, .3, .6, .9, 1, 1, 1, 1, 1, 1, 1, 1, .9, .9, 1, 1, .9, .7, .5]
TZ_OFFSETS_H = [-8, -7, -5, -4, -3, 0, 1, 2, 3, 5.5, 8, 9, 10]
# Which corpora an organic user draws from (d: topically similar users are ordinary diversity).
PERSONAS = {
    "chat": [("chat", 0.9), ("search", 0.1)],
    "search": [("search", 0.75), ("chat", 0.25)],
    "sql": [("sql", 0.75), ("chat", 0.15), ("python", 0.1)],
    "python": [("python", 0.6), ("chat", 0.3), ("sql", 0.1)],
}
PERSONA_WEIGHTS = {"chat": 0.42, "search": 0.25, "sql": 0.2, "python": 0.13}


def load(rel: str) -> list[dict]:
    path = DATA / rel
    opener = gzip.open if rel.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def texts(rel: str) -> list[str]:
    return [r["text"] for r in load(rel)]


# =====================================================================================
# Hand-written material: popular one-liners, the organic app, batch jobs and campaigns.
# =====================================================================================

# a. Popular one-liners and how many organic accounts send each at scale 1 (sum 2,660).
POPULAR = [
    ("hi", 400), ("hello", 300), ("tell me a joke", 250), ("what is the meaning of life", 200),
    ("how are you", 180), ("test", 150), ("who are you", 150), ("what can you do", 130),
    ("can you help me", 110), ("thank you", 100), ("write a poem about love", 100),
    ("tell me a fun fact", 90), ("write a short story", 80), ("what is ai", 80), ("what is 2+2", 70),
    ("write a haiku about the ocean", 60), ("what time is it", 60),
    ("give me a random number between 1 and 10", 50), ("translate hello to spanish", 50),
    ("summarize the plot of romeo and juliet", 50),
]
QUESTION_WORDS = ("what", "who", "how", "can", "why", "when")


def trivial_variant(text: str, rng: random.Random) -> str:
    """Case, punctuation and whitespace noise only: the words stay the same."""
    if rng.random() < 0.4:
        return text
    t = text
    r = rng.random()
    if r < 0.5:
        t = t[0].upper() + t[1:]
    elif r < 0.6:
        t = t.upper()
    elif r < 0.7:
        t = t.title()
    if rng.random() < 0.6:
        if t.lower().startswith(QUESTION_WORDS):
            t += rng.choice(["?", "??", " ?", "?!"])
        elif t.lower() in ("hi", "hello", "test", "thank you"):
            t += rng.choice(["!", "!!", ".", " :)"])
        else:
            t += rng.choice([".", "!", "?", " please"])
    if rng.random() < 0.15:
        t = t.replace(" ", "  ", 1)
    if rng.random() < 0.15:
        t = rng.choice([" ", "\n", "  "]) + t + rng.choice(["", " ", "\n"])
    return t


# b. The organic writing-assistant app: one template per button, user text in the slot.
APP_TEMPLATES = [
    ("rewrite-professional", "Rewrite the following text to be more professional:\n\n{text}"),
    ("fix-grammar", "Fix the grammar and spelling in the following text. Keep the meaning unchanged.\n\n{text}"),
    ("shorten", "Make the following text shorter and clearer:\n\n{text}"),
]

# c. Legitimate batch jobs, one account each: (name, template, pool, prompts at scale 1).
BATCH_JOBS = [
    ("sentiment", "Classify the sentiment of this review as positive or negative. Answer with one word.\n\n"
     "Review: {x}", "reviews", 700),
    ("translate-fr", "Translate to French: {x}", "translate", 500),
    ("docstring", "Write a concise Google-style docstring for this Python function. Return only the "
     "docstring.\n\n```python\n{x}\n```", "code", 400),
    ("news-entities", "Extract the people, organisations and places named in this news snippet. Answer as "
     "a JSON object with the keys \"people\", \"orgs\" and \"places\".\n\n{x}", "news", 250),
]

# e. camp-math-cot: three templates, eight hand-written rewordings each, one picked per prompt.
MATH_COT = {
    "solve-hash": [
        "Solve the following math problem step by step. Show all of your reasoning and put the final answer after '####'.\n\nProblem: {q}",
        "Work through this math problem one step at a time, showing every bit of reasoning, and write the final answer after '####'.\n\nProblem: {q}",
        "Please solve this problem step by step. Explain your reasoning fully and give the final answer after '####'.\n\nProblem: {q}",
        "Solve the math word problem below. Show each step of your reasoning and finish with the answer after '####'.\n\nProblem: {q}",
        "Give a step-by-step solution to the following problem, showing all reasoning, then write '####' followed by the final answer.\n\nProblem: {q}",
        "Carefully solve this problem, laying out every step of the reasoning. End with '####' and the final answer.\n\nProblem: {q}",
        "Step by step, solve the following math problem. Include all your reasoning; the final answer goes after '####'.\n\nProblem: {q}",
        "Break the following math problem into steps and solve it, showing the full reasoning. Put the final answer after '####'.\n\nProblem: {q}",
    ],
    "lets-think": [
        "{q}\n\nLet's think step by step. Explain each step of your reasoning, then state the final numeric answer on its own line.",
        "{q}\n\nThink it through step by step, explaining each step, and then give the final number on a separate line.",
        "{q}\n\nLet's reason about this step by step. Justify every step and write only the final numeric answer on the last line.",
        "{q}\n\nGo step by step and explain your thinking at each stage. Finish with the numeric answer on a line by itself.",
        "{q}\n\nPlease reason step by step, describing each step, and then put the final numerical answer on its own line.",
        "{q}\n\nLet's work this out step by step. Explain your reasoning as you go and end with just the number on the final line.",
        "{q}\n\nThink step by step and show your reasoning for each step. The last line should contain only the final answer.",
        "{q}\n\nSolve this by thinking step by step; explain each step, then give the numeric result on its own line.",
    ],
    "tutor": [
        "You are a meticulous math tutor. Work through this word problem carefully, checking each calculation, and finish with 'The answer is: <number>'.\n\n{q}",
        "Act as a careful math teacher. Solve the word problem below, double-checking every calculation, and end with 'The answer is: <number>'.\n\n{q}",
        "You are an expert math tutor. Solve this word problem thoroughly, verify each arithmetic step, and conclude with 'The answer is: <number>'.\n\n{q}",
        "Pretend you are a patient math tutor. Go through the following word problem, checking every computation, and close with 'The answer is: <number>'.\n\n{q}",
        "As a precise mathematics tutor, work out this word problem step by step, confirming each calculation, and end your reply with 'The answer is: <number>'.\n\n{q}",
        "You are a detail-oriented math tutor. Solve the problem below, re-checking all calculations, and finish by writing 'The answer is: <number>'.\n\n{q}",
        "Take the role of a meticulous tutor. Carefully solve this math word problem, check each calculation, and finish with the line 'The answer is: <number>'.\n\n{q}",
        "Behave like a rigorous math tutor: solve the word problem that follows, check each step's arithmetic, and conclude with 'The answer is: <number>'.\n\n{q}",
    ],
}

# f. Per-account decorations (camp-code-synth, camp-sql-distill).
GREETINGS = ["Hi!", "Hello,", "Hey there,", "Good day.", "Greetings!", "Hi assistant,", "Yo,", "Dear AI,", ""]
ID_FORMATS = ["[{tok}]", "req-{tok}:", "#{tok}", "({tok})", "ID {tok} -", "<{tok}>"]
SIGNOFFS = ["Thanks!", "Thank you in advance.", "Cheers,\n{name}", "-- {name}", "Much appreciated.",
            "Regards, {name}", "ty", "Please be thorough.", "Best,\n{name}"]
NAMES = ["Alex", "Sam", "Jordan", "Taylor", "Chris", "Priya", "Wei", "Lena", "Omar", "Ivan", "Maria", "Kenji"]
TOOLS = ["QueryBot", "dbhelper", "sqlgen-cli", "devassist", "stackpilot", "codeq"]

# g. camp-reasoning-intl: German and Spanish instructions around English BIG-Bench Hard items.
INTL = {
    "de": [
        ("de-schritt", "Beantworte die folgende Aufgabe. Denke Schritt für Schritt nach und erkläre jeden Schritt, bevor du die endgültige Antwort gibst.\n\nAufgabe: {x}"),
        ("de-begruende", "Lies die folgende Frage sorgfältig durch und begründe deine Antwort ausführlich. Schreibe am Ende: „Die Antwort lautet: …“\n\n{x}"),
        ("de-experte", "Du bist ein Experte für logisches Denken. Löse das folgende Problem, erkläre deine Überlegungen und nenne zum Schluss die richtige Antwort.\n\n{x}"),
    ],
    "es": [
        ("es-paso", "Resuelve el siguiente problema de razonamiento. Explica tu razonamiento paso a paso y termina con «La respuesta es: …».\n\n{x}"),
        ("es-analiza", "Analiza con cuidado la siguiente pregunta y razona paso a paso antes de dar la respuesta final.\n\nPregunta: {x}"),
    ],
}

# h. camp-low-slow: the classic Alpaca prompt format and a plain wrapper.
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n{i}\n\n"
                "### Input:\n{x}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{i}\n\n### Response:")
EXPERT = "You are a world-class assistant. Give the best possible, detailed answer to the following request.\n\nRequest: {i}"

# j. camp-fully-reworded: every part drawn from alternatives, with synonyms inside each part, so no
# phrase of four or more words is shared by more than a small fraction of the campaign's prompts.
RW_OPENERS = [
    "", "", "{Hey|Hi|Hello} there{!|,|.}", "{Quick|Short|Small} {one|question|favour} for you{:|.|!}",
    "{I'm|I am} {stuck|stumped|lost} on {something|this one|a problem}{.|!|:}",
    "{Hoping|Hope} you can {help|assist|lend a hand}{.|!}", "{Morning|Evening|Afternoon}{!|.|,}",
    "{Need|Could use|Looking for} some {help|support|guidance}{.|:}",
]
RW_INSTRUCTIONS = [
    "{Work out|Solve|Figure out|Crack} {this|the} {problem|question|puzzle|exercise} {one step at a time|step by step|stage by stage|piece by piece}",
    "{Walk|Take|Lead|Guide} me through {the|your} {reasoning|logic|thinking} {for|behind|on} {this|the following|the} {word problem|math question|exercise|task}",
    "{I need|I'd like|I want|Give me} a {detailed|thorough|careful|complete} {solution|derivation|explanation} {with every calculation shown|showing all the arithmetic|with each intermediate result|including the intermediate numbers}",
    "{Reason|Think} {carefully|methodically|slowly|patiently} {about|through} {what follows|the question below|this one|the text below}, {explaining|justifying|narrating} {each|every} {move|step|calculation}",
    "{Break down|Decompose|Dissect|Unpack} {the|this|that} {task|problem|question} {into small steps|into parts|bit by bit|piece by piece} {and solve it|then answer it|and get the result|to reach the answer}",
    "{Can|Could|Would} you {compute|calculate|determine|find} the {answer|result|final value|solution}{, and show how you got there| and show your working| with a full explanation|, explaining how}",
    "{Help|Assist} me {solve|answer|understand|get through} {this|the following|the next} {word problem|math question|exercise|homework item}, {showing|laying out|writing down} {all|each of} the {steps|calculations|stages}",
]
RW_INTROS = ["", "", "", "Problem:", "Here it is:", "Question —", "The exercise:", "Details:", "It goes like this:",
             "Text:", ">>"]
RW_CLOSERS = [
    "", "", "",
    "{End|Finish|Conclude|Wrap up} with the {final|numeric|last} {answer|number|result} {on its own line|in bold|after 'Answer:'|clearly marked}.",
    "{Please|Kindly|Do} {double-check|verify|re-check|confirm} {the|your} {arithmetic|math|numbers|computations}{.|!}",
    "{Keep|Make} {it|the explanation|your answer} {clear|simple|easy to follow|readable}{.|, thanks.|, please.}",
    "{Thanks|Thank you|Cheers|Much obliged}{!|.| a lot.| in advance.}",
    "{The|My} {teacher|tutor|professor|class} {wants|expects|needs} {the|every|all} {steps|working|reasoning} {shown|written out|included}.",
]


def spin(text: str, rng: random.Random) -> str:
    """Expands {a|b|c} alternatives (not nested)."""
    out, i = [], 0
    while i < len(text):
        j = text.find("{", i)
        if j < 0:
            out.append(text[i:])
            break
        k = text.index("}", j)
        out.append(text[i:j])
        out.append(rng.choice(text[j + 1:k].split("|")))
        i = k + 1
    return "".join(out)


def fully_reworded(q: str, rng: random.Random) -> str:
    opener = spin(rng.choice(RW_OPENERS), rng)
    instr = spin(rng.choice(RW_INSTRUCTIONS), rng)
    instr += rng.choice([".", ":", "!", "", " please.", ", please:"])
    intro = rng.choice(RW_INTROS)
    closer = spin(rng.choice(RW_CLOSERS), rng)
    slot = (intro + (" " if rng.random() < 0.5 else "\n") + q) if intro else q
    sep = rng.choice(["\n\n", "\n", " "])
    if rng.random() < 0.6:
        parts = [opener, instr, slot, closer]
    else:
        parts = [opener, slot, instr, closer]
    return sep.join(p.strip() for p in parts if p.strip())


class Campaign:
    """One campaign: its size, timing, evasions and how it builds a prompt."""

    def __init__(self, name, accounts, per_account, window, make, interval_s=(60, 900),
                 cover_share=0.0, cover_frac=(0.1, 0.3), low_and_slow=False, state=None):
        self.name, self.accounts, self.per_account, self.window = name, accounts, per_account, window
        self.make, self.interval_s, self.low_and_slow = make, interval_s, low_and_slow
        self.cover_share, self.cover_frac = cover_share, cover_frac
        self._state = state or (lambda rng: {})

    def new_account_state(self, rng: random.Random) -> dict:
        return self._state(rng)


def _token(rng: random.Random) -> str:
    return f"{rng.getrandbits(24):06x}"


def decorated_state(rng: random.Random) -> dict:
    """f. A per-account greeting + ID prefix and sign-off (+ running reference) suffix."""
    prefix = (rng.choice(GREETINGS) + " " + rng.choice(ID_FORMATS).format(tok=_token(rng))).strip()
    suffix = rng.choice(SIGNOFFS).format(name=rng.choice(NAMES))
    return {"prefix": prefix, "suffix": suffix, "ref": _token(rng), "seq": rng.randrange(1000),
            "ref_on": rng.random() < 0.5}


def decorate(body: str, st: dict) -> str:
    st["seq"] += 1
    tail = st["suffix"] + (f"\nref:{st['ref']}-{st['seq']:04d}" if st["ref_on"] else "")
    return f"{st['prefix']}\n{body}\n\n{tail}"


def make_math(rng, pools, st):
    name = rng.choices(list(MATH_COT), [0.4, 0.35, 0.25])[0]
    k = rng.randrange(len(MATH_COT[name]))
    return MATH_COT[name][k].format(q=pools["gsm_a"].draw()), f"{name}/p{k + 1}"


def make_code(rng, pools, st):
    r = rng.random()
    if r < 0.5:
        body, t = ("Write a Python function for the task below. Include type hints, a docstring and at least "
                   "three pytest unit tests.\n\nTask: " + pools["mbpp"].draw()), "mbpp"
    elif r < 0.58:
        body, t = ("Complete the following Python function. Return the full implementation, then briefly "
                   "explain the algorithm and its time complexity.\n\n```python\n" + pools["humaneval"].draw()
                   + "```"), "humaneval"
    else:
        item = pools["code_alpaca"].draw()
        body = ("Provide a high-quality, well-commented solution to this programming instruction, then "
                "explain how it works.\n\nInstruction: " + item["text"]
                + (f"\nInput: {item['input']}" if item["input"] else ""))
        t = "code-alpaca"
    return decorate(body, st), t


def make_intl(rng, pools, st):
    name, tpl = rng.choice(INTL[st["lang"]])
    return tpl.format(x=pools["bbh"].draw()), name


def make_low_slow(rng, pools, st):
    item = pools["alpaca"].draw()
    if rng.random() < 0.3:
        p = EXPERT.format(i=item["text"]) + (f"\n\nContext: {item['input']}" if item["input"] else "")
        return p, "expert"
    if item["input"]:
        return ALPACA_INPUT.format(i=item["text"], x=item["input"]), "alpaca-input"
    return ALPACA_NO_INPUT.format(i=item["text"]), "alpaca-no-input"


def make_t0(rng, pools, st):
    item = pools["t0"].draw()
    return item["text"].rstrip("\n"), item["template"]


def make_reworded(rng, pools, st):
    return fully_reworded(pools["gsm_b"].draw(), rng), "compositional"


def make_sql(rng, pools, st):
    r = rng.random()
    if r < 0.5:
        body, t = ("Answer this Stack Overflow question as an expert DBA. Give a complete, working SQL solution, "
                   "explain every clause and mention edge cases.\n\nQuestion title: " + pools["staqc_slot"].draw()), "so-dba"
    elif r < 0.8:
        body, t = (f"Here is a SQL question from a developer: \"{pools['staqc_slot'].draw()}\". Write the query for "
                   "PostgreSQL and for MySQL, and explain the differences."), "two-dialects"
    else:
        body, t = ("Write production-quality Python that solves the following. Return one code block followed "
                   "by a two-sentence explanation.\n\n" + pools["conala_slot"].draw()), "python-prod"
    st["seq"] += 1
    return f"{body}\n\n— sent via {st['tool']} ({st['ref']}-{st['seq']})", t


CAMPAIGNS = [
    # name, accounts at scale 1, prompts per account, active days, builder, evasions
    Campaign("camp-math-cot", 40, (30, 60), (0.3, 3.6), make_math, cover_share=0.5, cover_frac=(0.1, 0.25)),
    Campaign("camp-code-synth", 25, (50, 100), (1.0, 3.9), make_code, cover_share=0.4, cover_frac=(0.05, 0.15),
             state=decorated_state),
    Campaign("camp-reasoning-intl", 30, (20, 40), (0.5, 2.5), make_intl,
             state=lambda rng: {"lang": "de" if rng.random() < 0.7 else "es"}),
    Campaign("camp-low-slow", 300, (2, 5), (0.0, 4.0), make_low_slow, low_and_slow=True),
    Campaign("camp-t0-mix", 50, (10, 30), (1.5, 3.5), make_t0, cover_share=1.0, cover_frac=(0.15, 0.3)),
    Campaign("camp-fully-reworded", 50, (20, 40), (0.8, 3.8), make_reworded),
    Campaign("camp-sql-distill", 20, (40, 80), (2.0, 3.9), make_sql, interval_s=(30, 300),
             state=lambda rng: {"tool": rng.choice(TOOLS), "ref": _token(rng), "seq": 0}),
]


class Pool:
    """Draws items without replacement; once empty it reshuffles and goes round again (counted)."""

    def __init__(self, name: str, items: list, rng: random.Random):
        self.name, self.items, self.rng = name, list(items), rng
        self.order: list = []
        self.reused = 0
        self.rounds = 0
        self._refill()

    def _refill(self):
        self.order = list(self.items)
        self.rng.shuffle(self.order)
        self.rounds += 1

    def fresh(self) -> bool:
        return bool(self.order) and self.rounds == 1

    def draw(self):
        if not self.order:
            self._refill()
        if self.rounds > 1:
            self.reused += 1
        return self.order.pop()


class Generator:
    def __init__(self, seed: int, scale: float):
        self.rng = random.Random(seed)
        self.scale = scale
        self.rows: list[tuple[int, str, int, dict]] = []  # (ts, account, seq, row)
        self.ids: set[str] = set()
        self._load_pools()

    # ------------------------------------------------------------------ pools
    def _load_pools(self):
        rng = self.rng
        uo = load("organic/self_instruct_user_oriented.jsonl")
        hh = texts("organic/hh_rlhf_first_turns.jsonl")
        rng.shuffle(hh)
        # what users paste into the writing app: task inputs and longer chat openers
        app_text = [r["input"] for r in uo if len(r["input"]) >= 20] + [t for t in hh[:800] if len(t) >= 40]
        chat = (texts("organic/arena_hard.jsonl") + texts("organic/koala.jsonl")
                + texts("organic/mt_bench.jsonl") + texts("organic/wizardlm_testset.jsonl")
                + texts("organic/alpaca_eval.jsonl") + texts("organic/instruction_wild.jsonl")
                + hh[800:] + texts("organic/awesome_chatgpt_prompts.jsonl")
                + [r["text"] + ("\n\n" + r["input"] if r["input"] else "") for r in uo])
        nq = texts("organic/nq_open.jsonl.gz")
        rng.shuffle(nq)
        staqc = texts("organic/staqc_sql_titles.jsonl.gz")
        rng.shuffle(staqc)
        conala = texts("organic/conala_intents.jsonl")
        rng.shuffle(conala)
        gsm = texts("harvest/gsm8k_questions.jsonl.gz")
        rng.shuffle(gsm)
        ca = load("harvest/code_alpaca.jsonl.gz")
        rng.shuffle(ca)
        self.pools = {
            # organic
            "chat": Pool("chat", chat, rng),
            "search": Pool("search", nq[1200:], rng),
            "sql": Pool("sql", staqc[4000:], rng),
            "python": Pool("python", conala[500:], rng),
            "app_text": Pool("app_text", app_text, rng),
            # legitimate batch jobs
            "reviews": Pool("reviews", texts("harvest/t0_reviews.jsonl.gz"), rng),
            "translate": Pool("translate", nq[:1200], rng),
            "code": Pool("code", [r["code"] for r in load("harvest/mbpp.jsonl.gz")], rng),
            "news": Pool("news", texts("harvest/t0_news.jsonl.gz"), rng),
            # campaign slot material (disjoint from the organic pools above)
            "gsm_a": Pool("gsm_a", gsm[:4500], rng),
            "gsm_b": Pool("gsm_b", gsm[4500:], rng),
            "mbpp": Pool("mbpp", texts("harvest/mbpp.jsonl.gz"), rng),
            "humaneval": Pool("humaneval", texts("harvest/humaneval.jsonl"), rng),
            "code_alpaca": Pool("code_alpaca", ca[:2500], rng),
            "alpaca": Pool("alpaca", load("harvest/alpaca_en_demo.jsonl") + ca[2500:], rng),
            "bbh": Pool("bbh", texts("harvest/bbh.jsonl.gz"), rng),
            "t0": Pool("t0", load("harvest/t0_templates.jsonl.gz"), rng),
            "staqc_slot": Pool("staqc_slot", staqc[:4000], rng),
            "conala_slot": Pool("conala_slot", conala[:500], rng),
        }

    # ---------------------------------------------------------------- helpers
    def n(self, base: float) -> int:
        return max(1, round(base * self.scale))

    def new_account(self) -> str:
        while True:
            a = f"acct-{self.rng.getrandbits(40):010x}"
            if a not in self.ids:
                self.ids.add(a)
                return a

    def weighted_sample(self, accounts: list[dict], k: int, exp: float) -> list[dict]:
        """k distinct accounts, each drawn with weight base^exp (Efraimidis–Spirakis keys)."""
        keyed = [(self.rng.random() ** (1.0 / acc["base"] ** exp), i) for i, acc in enumerate(accounts)]
        keyed.sort(reverse=True)
        return [accounts[i] for _, i in keyed[:k]]

    def organic_text(self, persona: str) -> str:
        srcs = PERSONAS[persona]
        src = self.rng.choices([s for s, _ in srcs], [w for _, w in srcs])[0]
        if not self.pools[src].fresh():  # prefer another fresh corpus to cross-account repeats
            src = next((s for s, _ in srcs if self.pools[s].fresh()), src)
        return self.pools[src].draw()

    def session_times(self, k: int) -> list[int]:
        """k timestamps in sessions at plausible local hours for one organic user."""
        rng = self.rng
        tz = rng.choice(TZ_OFFSETS_H)
        sessions = max(1, min(k, round(k / rng.uniform(2, 7))))
        sizes = [1] * sessions
        for _ in range(k - sessions):
            sizes[rng.randrange(sessions)] += 1
        out = []
        for size in sizes:
            hour = rng.choices(range(24), HOUR_WEIGHTS)[0]
            t = rng.randrange(DAYS) * DAY_MS + int((hour - tz) * 3_600_000) + rng.randrange(3_600_000)
            for _ in range(size):
                out.append(t % SPAN_MS)
                t += int(rng.expovariate(1 / 100_000)) + 8_000
        return sorted(out)

    def emit(self, account: str, label: str, items: list[tuple[str, str, str]], times: list[int]):
        """items: (prompt, kind, template) in the account's order; times sorted, same length."""
        for seq, ((prompt, kind, template), ts) in enumerate(zip(items, sorted(times))):
            row = {"account_id": account, "prompt": prompt, "timestamp_ms": EPOCH_MS + ts,
                   "label": label, "kind": kind}
            if template:
                row["template"] = template
            self.rows.append((ts, account, seq, row))

    # ---------------------------------------------------------------- organic
    def organic_count(self) -> int:
        r = self.rng.random()
        if r < 0.85:  # most users: 1–10 prompts, skewed to few
            return self.rng.choices(range(1, 11), [1 / k ** 1.1 for k in range(1, 11)])[0]
        lo, hi = (11, 49) if r < 0.97 else (50, 300)  # some regulars, a heavy tail
        return int(math.exp(self.rng.uniform(math.log(lo), math.log(hi + 1))))

    def organic(self):
        rng = self.rng
        accounts = []
        for _ in range(self.n(ORGANIC_ACCOUNTS)):
            persona = rng.choices(list(PERSONA_WEIGHTS), list(PERSONA_WEIGHTS.values()))[0]
            accounts.append({"id": self.new_account(), "persona": persona,
                             "items": [], "base": self.organic_count()})
        # a. popular one-liners, near-verbatim, each from 50–400 accounts; busier users are likelier
        # to send any given one (weight ∝ activity^POPULAR_ACTIVITY_EXP).
        for text, count in POPULAR:
            for acc in self.weighted_sample(accounts, self.n(count), POPULAR_ACTIVITY_EXP):
                for _ in range(1 if rng.random() < 0.85 else rng.randint(2, 3)):
                    acc["items"].append((trivial_variant(text, rng), "popular", "popular/" + text))
        # b. the writing-assistant app: many accounts, a small share of each one's traffic.
        eligible = [a for a in accounts if a["base"] >= 4]
        for acc in rng.sample(eligible, min(len(eligible), self.n(APP_ACCOUNTS))):
            total = acc["base"] + len(acc["items"])
            k = max(1, min(int(0.2 * (total + 1)), round(total * rng.uniform(0.05, 0.25))))
            for _ in range(k):
                name, tpl = rng.choices(APP_TEMPLATES, [0.5, 0.3, 0.2])[0]
                acc["items"].append((tpl.format(text=self.pools["app_text"].draw()), "app", "app/" + name))
        for acc in accounts:
            for _ in range(acc["base"]):
                acc["items"].append((self.organic_text(acc["persona"]), "organic", ""))
            rng.shuffle(acc["items"])
            self.emit(acc["id"], "organic", acc["items"], self.session_times(len(acc["items"])))
        # c. single accounts running big legitimate templated batch jobs (plus a little chat).
        for name, tpl, pool, size in BATCH_JOBS:
            acc = self.new_account()
            k = rng.randint(3, 10)
            self.emit(acc, "organic", [(self.organic_text("chat"), "organic", "") for _ in range(k)],
                      self.session_times(k))
            items = [(tpl.format(x=self.pools[pool].draw()), "batch", "batch/" + name)
                     for _ in range(self.n(size))]
            t = rng.randrange(int(0.2 * DAY_MS), SPAN_MS - 2 * DAY_MS // 3)
            times = []
            for _ in items:
                times.append(min(t, SPAN_MS - 1))
                t += rng.randrange(2_000, 8_000)
            self.emit(acc, "organic", items, times)

    # --------------------------------------------------------------- campaigns
    def campaign(self, spec: Campaign):
        rng = self.rng
        cs, ce = int(spec.window[0] * DAY_MS), int(spec.window[1] * DAY_MS)
        for _ in range(self.n(spec.accounts)):
            acc = self.new_account()
            state = spec.new_account_state(rng)
            k = rng.randint(*spec.per_account)
            items = []
            for _ in range(k):
                prompt, template = spec.make(rng, self.pools, state)
                items.append((prompt, "campaign", f"{spec.name}/{template}"))
            if rng.random() < spec.cover_share:  # i. cover traffic, at most 30% of the account's
                frac = rng.uniform(*spec.cover_frac)
                for _ in range(max(1, int(k * frac / (1 - frac)))):  # floor: stays ≤ 30%
                    if rng.random() < 0.1:
                        text, _count = rng.choice(POPULAR)
                        items.append((trivial_variant(text, rng), "cover", ""))
                    else:
                        persona = rng.choice(["chat", "search", "chat", "sql"])
                        items.append((self.organic_text(persona), "cover", ""))
                # cover prompts go anywhere in the account's sequence
                head, tail = items[:k], items[k:]
                for it in tail:
                    head.insert(rng.randrange(len(head) + 1), it)
                items = head
            if spec.low_and_slow:  # h. hours or days apart, across the whole window
                times = [rng.randrange(cs, ce) for _ in items]
            else:
                mean = rng.uniform(*spec.interval_s) * 1000
                mean = min(mean, (ce - cs) / len(items))
                t = cs + rng.randrange(max(1, int(ce - cs - mean * len(items))))
                times = []
                for _ in items:
                    times.append(min(t, ce - 1))
                    t += int(mean * rng.uniform(0.4, 1.6))
            self.emit(acc, spec.name, items, times)

    def run(self) -> list[dict]:
        self.organic()
        for spec in CAMPAIGNS:
            self.campaign(spec)
        self.rows.sort(key=lambda r: (r[0], r[1], r[2]))
        return [r[3] for r in self.rows]


def summary(rows: list[dict], pools: dict) -> str:
    by_label = Counter(r["label"] for r in rows)
    accounts: dict[str, set] = {}
    for r in rows:
        accounts.setdefault(r["label"], set()).add(r["account_id"])
    kinds = Counter(r["kind"] for r in rows)
    lines = [f"prompts {len(rows)}, accounts {sum(len(v) for v in accounts.values())}",
             "kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))]
    for label in sorted(by_label):
        lines.append(f"  {label:<22} accounts {len(accounts[label]):>5}  prompts {by_label[label]:>6}")
    reused = [f"{p.name} {p.reused}" for p in pools.values() if p.reused]
    lines.append("draws past the end of a pool (repeats): " + (", ".join(reused) or "none"))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, help="output JSONL path (- for stdout)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies account counts and batch sizes")
    a = ap.parse_args()
    if a.scale <= 0:
        ap.error("--scale must be positive")
    started = time.monotonic()
    gen = Generator(a.seed, a.scale)
    rows = gen.run()
    out = Path(a.out)

    def write(f):
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    if a.out == "-":
        write(sys.stdout)
    elif out.is_symlink() or (out.exists() and not out.is_file()):
        # A link (/dev/stdout, say) or a pipe is written through, never replaced by a file.
        with open(out, "w", encoding="utf-8", newline="\n") as f:
            write(f)
    else:
        # A regular file: whole or not at all, through a temporary file and a rename.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            write(f)
        tmp.replace(out)
    print(summary(rows, gen.pools), file=sys.stderr)
    print(f"wrote {a.out} in {time.monotonic() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
