"""doc-stats: summarises a text document (counts, frequent words, sha256, reading time).

Usage: doc_stats.py DOCUMENT [TOP]. DOCUMENT is a file name under $BILLY_INPUT_DIR
(default /workspace/in). Prints a JSON summary to stdout and writes word-frequencies.csv
and summary.md to $BILLY_OUTPUT_DIR (default /workspace/out). Standard library only.
Exit codes: 0 done, 1 cannot write the artifacts, 2 bad arguments or unreadable document.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

DEFAULT_TOP = 10
MAX_TOP = 100
WORDS_PER_MINUTE = 230
# Letters, optionally joined by an apostrophe (don't, l'homme); digits are not words.
WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
DOCUMENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
BOMS = [
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
]


class UsageError(Exception):
    """Bad arguments or an unreadable document: exit code 2."""


def parse_args(argv: list[str]) -> tuple[str, int]:
    if not 1 <= len(argv) <= 2:
        raise UsageError("usage: doc_stats.py DOCUMENT [TOP]")
    document = argv[0]
    if not DOCUMENT_NAME.match(document):
        raise UsageError(f"document {document!r} is not a plain file name")
    try:
        top = int(argv[1]) if len(argv) == 2 else DEFAULT_TOP
    except ValueError:
        raise UsageError(f"top {argv[1]!r} is not an integer") from None
    if not 1 <= top <= MAX_TOP:
        raise UsageError(f"top {top} is outside 1..{MAX_TOP}")
    return document, top


def read_document(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"document {path.name!r} not found in {path.parent}") from None
    except IsADirectoryError:
        raise UsageError(f"document {path.name!r} is a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read document {path.name!r}: {exc.strerror}") from None


def unmarked_utf16(data: bytes) -> str | None:
    """utf-16-le/be when NUL bytes sit mostly at odd/even offsets (UTF-16 without a BOM)."""
    sample = data[:4096]
    if len(sample) < 2 or b"\x00" not in sample:
        return None
    even_nuls = sample[0::2].count(0)
    odd_nuls = sample[1::2].count(0)
    half = len(sample) // 2
    if odd_nuls > half * 0.3 and even_nuls < half * 0.05:
        return "utf-16-le"
    if even_nuls > half * 0.3 and odd_nuls < half * 0.05:
        return "utf-16-be"
    return None


def decode(data: bytes) -> tuple[str, str]:
    """Text and the encoding used: BOM, UTF-16 by its NULs, UTF-8, cp1252, else Latin-1."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace"), encoding
    utf16 = unmarked_utf16(data)
    if utf16:
        return data.decode(utf16, errors="replace"), utf16
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    # Latin-1 maps every byte, so any input ends up as some text.
    return data.decode("latin-1"), "latin-1"


def summarise(document: str, data: bytes, top: int) -> tuple[dict, Counter]:
    text, encoding = decode(data)
    words = [word.lower() for word in WORD.findall(text)]
    counts = Counter(words)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    summary = {
        "document": document,
        "bytes": len(data),
        "encoding": encoding,
        "sha256": hashlib.sha256(data).hexdigest(),
        "lines": len(text.splitlines()),
        "words": len(words),
        "characters": len(text),
        "unique_words": len(counts),
        "top_words": [{"word": word, "count": count} for word, count in ranked[:top]],
        "reading_time_minutes": round(len(words) / WORDS_PER_MINUTE, 1),
        "artifacts": ["word-frequencies.csv", "summary.md"],
    }
    return summary, counts


def write_frequencies(path: Path, counts: Counter) -> None:
    total = sum(counts.values()) or 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["word", "count", "share"])
        for word, count in ranked:
            writer.writerow([word, count, f"{count / total:.6f}"])


def write_summary(path: Path, summary: dict) -> None:
    lines = [
        f"# {summary['document']}",
        "",
        f"- {summary['lines']} lines, {summary['words']} words, "
        f"{summary['characters']} characters ({summary['bytes']} bytes, {summary['encoding']})",
        f"- {summary['unique_words']} unique words",
        f"- reading time about {summary['reading_time_minutes']} minutes",
        f"- sha256 `{summary['sha256']}`",
        "",
        "| rank | word | count |",
        "| ---: | --- | ---: |",
    ]
    for rank, item in enumerate(summary["top_words"], start=1):
        lines.append(f"| {rank} | {item['word']} | {item['count']} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    input_dir = Path(os.environ.get("BILLY_INPUT_DIR", "/workspace/in"))
    output_dir = Path(os.environ.get("BILLY_OUTPUT_DIR", "/workspace/out"))
    try:
        document, top = parse_args(argv)
        data = read_document(input_dir / document)
    except UsageError as exc:
        print(f"doc-stats: {exc}", file=sys.stderr)
        return 2

    summary, counts = summarise(document, data, top)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_frequencies(output_dir / "word-frequencies.csv", counts)
        write_summary(output_dir / "summary.md", summary)
    except OSError as exc:
        print(f"doc-stats: cannot write artifacts to {output_dir}: {exc.strerror}", file=sys.stderr)
        return 1

    # Words may be any script; stdout is UTF-8 whatever the container's locale says.
    sys.stdout.reconfigure(encoding="utf-8")
    json.dump(summary, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
