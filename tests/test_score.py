"""`storynet-miner score`: the subnet's public rules on known answers, each figure worked out from the rules
(miner/score.py), and the command on a file and on stdin."""
from __future__ import annotations

import io
import json

import pytest

from miner.cli import main as cli
from miner.errors import ConfigError
from miner.score import fluency, read_answers, score_all
from tests.fakes import BLUEPRINT, CHAPTER

BLUEPRINT_ANSWER = {**BLUEPRINT, "task_type": "blueprint", "generation_time": 3.2}
CHAPTERS_ANSWER = {"chapters": [CHAPTER], "task_type": "chapters", "generation_time": 12.0}


def test_a_blueprint_scores_as_the_rules_say():
    """technical: JSON 10 + fields 10 (all seven, types right, themes bonus: capped) + time 10 = 30 -> 20;
    structure: fields 20 + setting and conflict lengths 5 + 5 + themes 10 = 40 -> 30; content: fluency 5
    (punctuation 2, distinct words 3; 33 words and 2 sentences earn no more) + originality 5 = 10 -> 6.67,
    what the service gave a blueprint in 2026-02; narrative by the rules 17 of 30."""
    [s] = score_all([BLUEPRINT_ANSWER])
    assert (s.technical, s.structure, s.content, s.narrative, s.total) == (20.0, 30.0, 6.67, 17.0, 73.67)


def test_time_past_30_s_and_a_copy_cost_what_the_rules_say():
    late_copy = {**BLUEPRINT_ANSWER, "generation_time": 45.0}
    first, second = score_all([BLUEPRINT_ANSWER, late_copy])
    assert second.technical == 17.18  # time 10 - 15 x 0.33 = 5.05, so 25.76 of 30
    assert second.content == 3.33  # the same answer again: originality 0


def test_chapters_score_as_the_rules_say():
    """structure: 1,230 characters 20 + 2 choices 10 + different consequences 10 -> 30; fluency 7 (219 words
    are short of the 300 and 500 the rules count for chapters); narrative: length 3, four paragraphs 1.5,
    varied sentences 1.5, no transition words."""
    [s] = score_all([CHAPTERS_ANSWER])
    assert (s.technical, s.structure, s.content, s.narrative) == (20.0, 30.0, 8.0, 20.5)


def test_an_answer_forwarded_without_its_task_scores_nothing_and_an_error_answer_nothing():
    no_task, error = score_all([{**BLUEPRINT}, {"error": "busy", "error_kind": "busy", "task_type": "chapters"}])
    assert no_task.total == 0 and "no task" in no_task.note
    assert error.total == 0 and error.note == "an error answer"


ENGLISH = ["She grew up on the night ferry and learned every star from the old navigator who raised her. "
           "Storms frighten her less than silence does.",
           "He left the mining guild after the collapse and swore he would never again send a crew below. "
           "His hands still shake whenever a bell rings.",
           "The archivist keeps the city's forbidden maps hidden beneath the floor of a flooded chapel. "
           "Three councils have searched for them in vain.",
           "A former duelist, she now teaches children to fence in the square where her brother fell. "
           "Each lesson ends with a minute of quiet.",
           "Nobody knows where the stranger came from, only that the harbour dogs follow him at night. "
           "He pays for bread with coins nobody recognises."]
CHINESE = ["她在夜航渡轮上长大，跟着抚养她的老领航员认识了每一颗星星。比起风暴，她更害怕寂静。",
           "矿井坍塌之后他离开了矿工行会，发誓再也不让任何队伍下井。每当钟声响起，他的手仍会发抖。",
           "档案管理员把城里的禁图藏在一座被水淹没的小教堂地板下面。三届议会都曾徒劳地搜寻过它们。",
           "她曾是一名决斗者，如今在哥哥倒下的广场上教孩子们击剑。每堂课都以一分钟的沉默结束。",
           "没有人知道那个陌生人从哪里来，只知道港口的狗每晚都跟着他。他用没人认得的硬币买面包。"]


def test_fluency_counts_words_by_whitespace_so_chinese_prose_earns_less():
    """The same five backgrounds: in English, punctuation 2 + distinct words 3 + more than 100 words 3 +
    sentences of 10-30 words 2; in Chinese, which puts no spaces between words, each sentence is one "word":
    no length and no sentence-variety points (the loss docs/protocol.md puts at about 3 of 100)."""
    english = {"characters": [{"background": b} for b in ENGLISH]}
    chinese = {"characters": [{"background": b} for b in CHINESE]}
    assert fluency(english, "characters") == 10.0
    assert fluency(chinese, "characters") == 5.0


def test_the_command_reads_json_lines_or_a_list_and_prints_a_table_or_json(tmp_path, capsys, monkeypatch):
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(a, ensure_ascii=False) for a in (BLUEPRINT_ANSWER, CHAPTERS_ANSWER)))
    assert cli(["score", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mean all" in out and "LLM judge" in out and "73.67" in out
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps([BLUEPRINT_ANSWER, CHAPTERS_ANSWER])))
    assert cli(["score", "-", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["means"]["all"]["answers"] == 2 and report["means"]["chapters"]["total"] == 78.5


def test_input_that_is_not_json_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(BLUEPRINT_ANSWER) + "\nnot json\n")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        read_answers(path.read_text())
    assert cli(["score", str(path)]) == 2


@pytest.mark.parametrize("bad", ["[1, 2", "{\"a\": }"])
def test_a_broken_single_document_is_refused_too(tmp_path, bad):
    path = tmp_path / "answers.json"
    path.write_text(bad)
    assert cli(["score", str(path)]) == 2
