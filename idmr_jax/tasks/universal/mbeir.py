"""M-BEIR (TIGER-AI-Lab/UniIR; data on HF ``TIGER-Lab/M-BEIR``): the release reader and UniIR's evaluation protocol
(``src/common/mbeir_retriever.py`` for the metric, ``src/data/mbeir_dataset.py`` for the instructions).

Layout under ``--root`` (EVAL_FORMATS.md, M-BEIR): ``query/<split>/mbeir_<key>_<split>.jsonl``,
``qrels/<split>/mbeir_<key>_<split>_qrels.txt``, ``cand_pool/local/mbeir_<pool>_cand_pool.jsonl`` (one local pool
per key; MSCOCO's are ``mscoco_task{0,3}_{val,test}``), ``cand_pool/global/mbeir_union_<split>_cand_pool.jsonl``
(the union pool), ``instructions/query_instructions.tsv`` and the images under ``mbeir_images/``. Image paths are
kept relative to the root; images are not opened here (the converter checks them).

The readers return the rows they can use and a `Skip` for every other row (file, line, id, field, code):
``missing_field``, ``bad_type`` (also a line that is not JSON, an id that is not ``"<dataset_id>:<n>"``),
``modality_mismatch`` (text or image present or absent against what ``*_modality`` says), ``empty_text``,
``key_mismatch`` (a query of another dataset or task than its file's key), ``duplicate_query`` / ``duplicate_name``
(a repeated qid / did: the first one is kept). A missing or unreadable file raises `ConversionError`.

Documented oddity kept valid: OVEN and InfoSeek queries may list positives of the *other* dataset (dids with the
other dataset id), which are not in the query's local pool: such a query is evaluated and counts as a miss there,
as in UniIR, which ranks every query of the file against the pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from idmr_jax.data.shards import ConversionError, Skip
from idmr_jax.tasks.universal.records import MODALITIES

NAME = "mbeir"
SPLITS = ("train", "val", "test")
DATASET_NAMES = {0: "visualnews", 1: "fashion200k", 2: "webqa", 3: "edis", 4: "nights", 5: "oven", 6: "infoseek",
                 7: "fashioniq", 8: "cirr", 9: "mscoco"}
# The candidate modality each task retrieves (task 5 is unused): the fallback for the instruction key.
TASK_TARGET_MODALITY = {0: "image", 1: "text", 2: "image,text", 3: "text", 4: "image", 6: "text", 7: "image",
                        8: "image,text"}
# The 16 test sets in UniIR's order (retrieval.yaml, and mbeir_retriever.py's dataset_order).
TEST_KEYS = ("visualnews_task0", "mscoco_task0", "fashion200k_task0", "webqa_task1", "edis_task2", "webqa_task2",
             "visualnews_task3", "mscoco_task3", "fashion200k_task3", "nights_task4", "oven_task6", "infoseek_task6",
             "fashioniq_task7", "cirr_task7", "oven_task8", "infoseek_task8")
# Recall cut-offs per key (retrieval.yaml correspond_metrics_name) and the paper's headline K.
WIDE_K_KEYS = ("fashion200k_task0", "fashion200k_task3", "fashioniq_task7")
KS = {key: (10, 20, 50) if key in WIDE_K_KEYS else (1, 5, 10) for key in TEST_KEYS}
HEADLINE_K = {key: 10 if key in WIDE_K_KEYS else 5 for key in TEST_KEYS}
INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"
_ID = re.compile(r"^(\d+):\S+$")

__all__ = ["HEADLINE_K", "INSTRUCTIONS_FILE", "KS", "SPLITS", "TEST_KEYS", "Candidate", "Query", "choose_instruction",
           "compute_metrics", "global_pool_name", "home_positives", "instructed_text", "instruction_for",
           "instruction_set", "key_of", "local_pool_name", "parse_key", "pool_file", "positive_modality",
           "qrels_file", "query_file", "read_instructions", "read_pool", "read_qrels", "read_queries", "uniir_text"]


# --- layout ------------------------------------------------------------------------------------------------------


def key_of(dataset_id: int, task_id: int) -> str:
    """The key UniIR names a (dataset, task) query set by, e.g. ``key_of(9, 0) == "mscoco_task0"``."""
    return f"{DATASET_NAMES[dataset_id]}_task{task_id}"


def parse_key(key: str) -> tuple[int, int]:
    """(dataset_id, task_id) of a key; ValueError for an unknown dataset or task."""
    name, _, task = key.rpartition("_task")
    ids = {v: k for k, v in DATASET_NAMES.items()}
    if name not in ids or not task.isdigit() or int(task) not in TASK_TARGET_MODALITY:
        raise ValueError(f"mbeir: unknown key {key!r} (expected <dataset>_task<id>, e.g. {TEST_KEYS[0]!r})")
    return ids[name], int(task)


def query_file(split: str, key: str) -> str:
    """The query file of `key` in `split`, relative to the root."""
    return f"query/{split}/mbeir_{key}_{split}.jsonl"


def qrels_file(split: str, key: str) -> str:
    """The qrels file of `key` in `split`, relative to the root."""
    return f"qrels/{split}/mbeir_{key}_{split}_qrels.txt"


def local_pool_name(key: str, split: str) -> str:
    """The local pool of `key`: the key itself, except MSCOCO, whose val and test pools are separate
    (``mscoco_task0_test``; retrieval.yaml)."""
    return f"{key}_{split}" if key.startswith("mscoco_") else key


def global_pool_name(split: str) -> str:
    """The union pool of a split ("union_test" = M-BEIR's global pool, the 16 local test pools together)."""
    return f"union_{split}"


def pool_file(pool: str) -> str:
    """The candidate pool file of a pool name, relative to the root."""
    folder = "global" if pool.startswith("union_") else "local"
    return f"cand_pool/{folder}/mbeir_{pool}_cand_pool.jsonl"


# --- rows --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    """One query row. ``positives`` are ``pos_cand_list`` as read (the converter replaces them by the qrels
    positives); ``image_path`` is relative to the root; ``extra`` holds the rest (src_content, the key)."""

    qid: str
    text: str | None
    image_path: str | None
    modality: str
    task_id: int
    dataset_id: int
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    key: str
    source: str
    source_index: int
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate row of pool `pool`; ``image_path`` relative to the root."""

    did: str
    text: str | None
    image_path: str | None
    modality: str
    pool: str
    source: str
    source_index: int
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Problem = tuple[str, str, str]  # (field, code, reason)


def _read_lines(root: str, rel: str) -> list[str]:
    try:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError as e:
        raise ConversionError(f"{rel}: missing (is --root the M-BEIR release folder?)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{rel}: unreadable: {e}") from e


def _jsonl(root: str, rel: str) -> list[tuple[int, Any]]:
    """(line index, parsed object or the JSONDecodeError) of every non-blank line."""
    rows = []
    for index, line in enumerate(_read_lines(root, rel)):
        if line.strip():
            try:
                rows.append((index, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((index, e))
    return rows


def _check_id(row: Mapping[str, Any], field: str) -> Problem | None:
    if field not in row:
        return field, "missing_field", f"no '{field}'"
    if not isinstance(row[field], str) or not _ID.match(row[field]):
        return field, "bad_type", f"'{field}' is {row[field]!r}, expected \"<dataset_id>:<n>\""
    return None


def _check_ids(row: Mapping[str, Any], field: str) -> Problem | None:
    if field not in row:
        return field, "missing_field", f"no '{field}'"
    ids = row[field]
    if not isinstance(ids, list):
        return field, "bad_type", f"'{field}' is {type(ids).__name__}, expected a list of ids"
    for i, did in enumerate(ids):
        if not isinstance(did, str) or not _ID.match(did):
            return f"{field}[{i}]", "bad_type", f"{did!r} is not an id \"<dataset_id>:<n>\""
    return None


def _side_problem(row: Mapping[str, Any], txt: str, img: str, mod: str) -> Problem | None:
    for field in (txt, img, mod):
        if field not in row:
            return field, "missing_field", f"no '{field}'"
    for field in (txt, img):
        if row[field] is not None and not isinstance(row[field], str):
            return field, "bad_type", f"'{field}' is {type(row[field]).__name__}, expected a string or null"
    modality, text, path = row[mod], row[txt], row[img] or None
    if modality not in MODALITIES:
        return mod, "bad_type", f"'{mod}' is {modality!r}, expected one of {sorted(MODALITIES)}"
    wants_text, wants_image = MODALITIES[modality]
    if wants_text and text is None:
        return txt, "modality_mismatch", f"'{mod}' is {modality!r} but '{txt}' is null"
    if wants_text and not text.strip():
        return txt, "empty_text", f"'{txt}' is empty"
    if not wants_text and text is not None and text.strip():
        return txt, "modality_mismatch", f"'{mod}' is {modality!r} but '{txt}' is given"
    if wants_image != (path is not None):
        return img, "modality_mismatch", f"'{mod}' is {modality!r} but '{img}' is {'null' if path is None else 'given'}"
    return None


def _sides(row: Mapping[str, Any], txt: str, img: str, mod: str) -> tuple[Problem | None, tuple]:
    """Checks the text, image path and modality fields against each other -> (problem, (text, path, modality)),
    the values None on a problem. Blank text where the modality has none counts as absent."""
    problem = _side_problem(row, txt, img, mod)
    if problem:
        return problem, (None, None, None)
    wants_text, wants_image = MODALITIES[row[mod]]
    path = posixpath.normpath(row[img].replace("\\", "/")) if wants_image else None
    return None, (row[txt] if wants_text else None, path, row[mod])


def _src_content(row: Mapping[str, Any], field: str) -> tuple[Problem | None, dict]:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        return (field, "bad_type", f"'{field}' is {type(value).__name__}, expected a JSON string or null"), {}
    return None, ({} if value is None else {"src_content": value})


def _read_rows(root: str, rel: str, id_field: str, parse: Callable[[Mapping[str, Any], int], Any],
               duplicate_code: str) -> tuple[list[Any], list[Skip]]:
    """Runs `parse(row, index)` (-> item, or a Problem) on every row of a jsonl file; skips bad and repeated ids."""
    items, skips, first = [], [], {}
    for index, row in _jsonl(root, rel):
        name = row.get(id_field) if isinstance(row, dict) and isinstance(row.get(id_field), str) else None
        if isinstance(row, json.JSONDecodeError):
            problem = ("", "bad_type", f"not a JSON line: {row}")
        elif not isinstance(row, dict):
            problem = ("", "bad_type", f"row is {type(row).__name__}, expected an object")
        elif name in first:
            problem = (id_field, duplicate_code, f"{name!r} already given by line {first[name]}")
        else:
            problem = parse(row, index)
        if name is not None:
            first.setdefault(name, index)
        if isinstance(problem, tuple):
            skips.append(Skip(rel, index, name, *problem, "record_skipped"))
        else:
            items.append(problem)
    return items, skips


def read_queries(root: str, split: str, key: str) -> tuple[list[Query], list[Skip]]:
    """The usable rows of ``query/<split>/mbeir_<key>_<split>.jsonl`` in file order, and a Skip for each other
    row (module docstring). ``dataset_id`` is the qid's prefix, as UniIR derives it."""
    dataset_id, task_id = parse_key(key)
    rel = query_file(split, key)

    def parse(row: Mapping[str, Any], index: int) -> Query | Problem:
        problem = _check_id(row, "qid")
        if problem:
            return problem
        problem, (text, path, modality) = _sides(row, "query_txt", "query_img_path", "query_modality")
        problem = problem or _check_ids(row, "pos_cand_list") or _check_ids(row, "neg_cand_list")
        if not problem and not row["pos_cand_list"]:
            problem = ("pos_cand_list", "missing_field", "no positive candidate")
        task = row.get("task_id")
        if not problem and "task_id" not in row:
            problem = ("task_id", "missing_field", "no 'task_id'")
        if not problem and (isinstance(task, bool) or not isinstance(task, int)):
            problem = ("task_id", "bad_type", f"'task_id' is {task!r}, expected an int")
        if not problem and task != task_id:
            problem = ("task_id", "key_mismatch", f"task {task} in the file of {key}")
        if not problem and int(row["qid"].split(":")[0]) != dataset_id:
            problem = ("qid", "key_mismatch", f"dataset {row['qid'].split(':')[0]} in the file of {key}")
        src_problem, extra = _src_content(row, "query_src_content")
        if problem or src_problem:
            return problem or src_problem
        return Query(qid=row["qid"], text=text, image_path=path, modality=modality, task_id=task,
                     dataset_id=dataset_id, positives=tuple(row["pos_cand_list"]),
                     negatives=tuple(row["neg_cand_list"]), key=key, source=rel, source_index=index,
                     extra={"key": key, **extra})

    return _read_rows(root, rel, "qid", parse, "duplicate_query")


def read_pool(root: str, pool: str) -> tuple[list[Candidate], list[Skip]]:
    """The usable rows of a candidate pool file (`pool_file`) in file order, and a Skip for each other row."""
    rel = pool_file(pool)

    def parse(row: Mapping[str, Any], index: int) -> Candidate | Problem:
        problem, (text, path, modality) = _sides(row, "txt", "img_path", "modality")
        problem = _check_id(row, "did") or problem
        src_problem, extra = _src_content(row, "src_content")
        if problem or src_problem:
            return problem or src_problem
        return Candidate(did=row["did"], text=text, image_path=path, modality=modality, pool=pool, source=rel,
                         source_index=index, extra=extra)

    return _read_rows(root, rel, "did", parse, "duplicate_name")


def read_qrels(root: str, split: str, key: str) -> tuple[dict[str, tuple[str, ...]], list[Skip]]:
    """``{qid: relevant dids in file order}`` from a qrels file (lines ``<qid> 0 <did> <relevance> <task_id>``; as
    UniIR's load_qrel, only relevance > 0 counts), and a Skip (``entry_ignored``) for each malformed line."""
    rel = qrels_file(split, key)
    qrels: dict[str, list[str]] = {}
    skips = []
    for index, line in enumerate(_read_lines(root, rel)):
        parts = line.split()
        if not parts:
            continue
        name = parts[0]
        if len(parts) != 5 or not parts[3].lstrip("-").isdigit() or not _ID.match(parts[0]) or not _ID.match(parts[2]):
            skips.append(Skip(rel, index, name, "line", "bad_type",
                              f"expected '<qid> 0 <did> <relevance> <task_id>', got {line.strip()!r}", "entry_ignored"))
            continue
        if int(parts[3]) > 0 and parts[2] not in qrels.setdefault(name, []):
            qrels[name].append(parts[2])
    return {qid: tuple(dids) for qid, dids in qrels.items() if dids}, skips


# --- instructions --------------------------------------------------------------------------------------------------


def read_instructions(root: str) -> dict[tuple[int, str, str], list[str]]:
    """``instructions/query_instructions.tsv`` -> ``{(dataset_id, query_modality, candidate_modality): prompts}``:
    a header line, then ``query_modality, cand_modality, dataset name, dataset_id, prompt_1..prompt_4`` per row;
    empty prompts are left out (mbeir_dataset.py _load_query_instructions). `ConversionError` naming the line for
    a row with fewer than 4 columns or a dataset_id that is not an int."""
    table = {}
    for index, line in enumerate(_read_lines(root, INSTRUCTIONS_FILE)[1:], start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) < 4 or not parts[3].strip().isdigit():
            raise ConversionError(f"{INSTRUCTIONS_FILE}: line {index}: expected query_modality, cand_modality, "
                                  f"dataset name, dataset_id, prompts (tab-separated), got {line!r}")
        key = (int(parts[3]), parts[0].strip(), parts[1].strip())
        table[key] = [p.strip() for p in parts[4:] if p.strip()]
    return table


def home_positives(query: Any) -> tuple[str, ...]:
    """The positives of the query's own dataset (did prefix == its dataset id): the ones UniIR keeps at evaluation
    to pick the positive that keys the instruction (mbeir_dataset.py, the OVEN/InfoSeek case)."""
    return tuple(did for did in query.positives if did.split(":")[0] == str(query.dataset_id))


def positive_modality(query: Any, modality_of_did: Mapping[str, str]) -> str:
    """The positive's modality that keys the instruction: UniIR takes a positive of the query's own dataset and its
    modality from the pool. Here the first such positive found in `modality_of_did` (UniIR draws one at random; a
    query's positives share one modality), else the first positive found, else the task's target modality."""
    for did in home_positives(query) + tuple(query.positives):
        if did in modality_of_did:
            return modality_of_did[did]
    return TASK_TARGET_MODALITY[query.task_id]


def instruction_set(query: Any, instructions: Mapping[tuple[int, str, str], Sequence[str]],
                    positive_modality: str) -> tuple[str, ...]:
    """The prompts UniIR draws the query's instruction from: keyed by (dataset id, query modality, the positive's
    modality); () when the table has none."""
    return tuple(instructions.get((query.dataset_id, query.modality, positive_modality), ()))


def choose_instruction(qid: str, prompts: Sequence[str]) -> str | None:
    """One of `prompts`, fixed per query: UniIR draws ``random.choice`` at every evaluation; here the index is the
    first 8 bytes of sha256(qid, UTF-8) as a big-endian int, modulo the number of prompts, so that every run and
    every machine choose the same one. None when there are no prompts."""
    if not prompts:
        return None
    digest = hashlib.sha256(qid.encode("utf-8")).digest()
    return prompts[int.from_bytes(digest[:8], "big") % len(prompts)]


def uniir_text(s: str | None) -> str:
    """UniIR's text clean-up (format_string in its data code): carriage returns removed, stripped of spaces and
    double quotes, the first letter upper-cased and a period added unless it ends in '.', '?' or '!'."""
    s = (s or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        s = s if s[-1] in ".?!" else s + "."
    return s


def instruction_for(query: Any, instructions: Mapping[tuple[int, str, str], Sequence[str]],
                    positive_modality: str) -> str | None:
    """The query's instruction at evaluation, cleaned as UniIR does: `choose_instruction` over `instruction_set`.
    `query` is a reader `Query` or a universal `QueryRecord` (qid, dataset_id, modality)."""
    prompt = choose_instruction(query.qid, instruction_set(query, instructions, positive_modality))
    return None if prompt is None else uniir_text(prompt)


def instructed_text(instruction: str | None, text: str | None) -> str:
    """The query text the model reads: ``"<instruction> <text>"`` cleaned as UniIR does (the instruction alone for
    an image-only query, the cleaned text alone without an instruction)."""
    return uniir_text(f"{instruction} {text or ''}" if instruction else text)


# --- metric --------------------------------------------------------------------------------------------------------


def compute_metrics(queries_by_key: Mapping[str, Sequence[Any]], rankings: Mapping[str, Sequence[str]]
                    ) -> dict[str, float]:
    """UniIR's recall (mbeir_retriever.py compute_recall_at_k), in percent: per key, Recall@K = the share of its
    queries with any positive (qrels) among the top K of its ranking (a hit rate), for K in `KS` (1, 5, 10; or 10,
    20, 50 for the fashion keys); ``mbeir/avg/headline`` = the mean over the keys present of R@`HEADLINE_K` (5, or
    10 for the fashion keys). Queries are reader `Query`s or `QueryRecord`s (qid, positives); rankings map a qid to
    dids, best first, at least the largest K of its key unless the pool is smaller. Every labelled query counts: a
    positive outside the ranked pool is a miss (the OVEN/InfoSeek oddity); one without a ranking, or whose ranking
    lists a did twice, is a ValueError naming it. UniIR rounds each fraction to 4 places; this does not."""
    metrics, headline = {}, []
    for key, queries in queries_by_key.items():
        labelled = [q for q in queries if q.positives]
        if not labelled:
            continue
        ks = KS.get(key, (1, 5, 10))
        hits = dict.fromkeys(ks, 0)
        for query in labelled:
            if query.qid not in rankings:
                raise ValueError(f"mbeir/{key}: query {query.qid!r} has no ranking")
            ranking = list(rankings[query.qid])
            if len(set(ranking)) != len(ranking):
                raise ValueError(f"mbeir/{key}: query {query.qid!r}: its ranking lists a candidate twice")
            relevant = set(query.positives)
            for k in ks:
                hits[k] += bool(relevant.intersection(ranking[:k]))
        for k in ks:
            metrics[f"{NAME}/{key}/R@{k}"] = 100.0 * hits[k] / len(labelled)
        headline.append(metrics[f"{NAME}/{key}/R@{HEADLINE_K.get(key, 5)}"])
    if not headline:
        raise ValueError("mbeir: no labelled query to score")
    metrics[f"{NAME}/avg/headline"] = sum(headline) / len(headline)
    return metrics
