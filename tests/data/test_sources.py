"""Record loading from DeGLA JSON, CSV/TSV and WebDataset shards, and the errors on malformed input."""
import io
import json
import tarfile

import pytest

from degla_fast.data.sources import load_records, read_image_bytes
from degla_fast.errors import DataError


def test_degla_json_image_and_image_id(tmp_path):
    items = [{"image": "a/x.jpg", "original": "cap 0", "enhanced": ["n0", "n1"]},
             {"image_id": 42, "original": "cap 1", "enhanced": ["m0"]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items))
    recs = load_records(path, image_root=tmp_path / "root")
    assert recs[0].image == str(tmp_path / "root" / "a/x.jpg")
    assert recs[1].image == str(tmp_path / "root" / "COCO_train2014_000000000042.jpg")
    assert [r.caption for r in recs] == ["cap 0", "cap 1"]
    assert recs[0].negatives == ("n0", "n1") and recs[1].negatives == ("m0",)
    # default root is the JSON's folder; custom pattern
    recs = load_records(path, image_pattern="img%03d.png")
    assert recs[1].image == str(tmp_path / "img042.png")


def test_degla_json_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"image": "a.jpg",\n "original": "x" "enhanced": []}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_records(path)


def test_degla_json_bad_record_names_record(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"image": "a.jpg", "original": "x"}, {"image": "b.jpg", "enhanced": []}]))
    with pytest.raises(DataError, match=r"r\.json: record 1: missing string field 'original'"):
        load_records(path)
    path.write_text(json.dumps([{"original": "x"}]))
    with pytest.raises(DataError, match=r"record 0: missing field 'image' or 'image_id'"):
        load_records(path)


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, sep):
    path = tmp_path / f"d{suffix}"
    rows = [["filepath", "title", "neg_caption"], ["i0.jpg", "a dog", "a cat|a cow"], ["i1.jpg", "a, red car", ""]]
    path.write_text("\n".join(sep.join(f'"{c}"' if "," in c else c for c in r) for r in rows) + "\n")
    recs = load_records(path)
    assert [r.caption for r in recs] == ["a dog", "a, red car"]
    assert recs[0].negatives == ("a cat", "a cow") and recs[1].negatives == ()
    assert recs[0].image == str(tmp_path / "i0.jpg")
    assert recs[1].where.endswith(":3")


def test_csv_custom_keys_and_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("img,cap,hard\nx.jpg,hello,n1;n2\ny.jpg,only two\n")
    recs = load_records(path, csv_img_key="img", csv_caption_key="cap", csv_hard_captions_key="hard",
                        csv_negatives_separator=";")
    assert recs[0].negatives == ("n1", "n2")
    bad = tmp_path / "short.csv"
    bad.write_text("img,cap\nx.jpg,hello\ny.jpg\n")
    with pytest.raises(DataError, match=r"short\.csv:3: expected 2 fields"):
        load_records(bad, csv_img_key="img", csv_caption_key="cap")
    with pytest.raises(DataError, match=r"d\.csv:1: missing column"):
        load_records(path)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for k in range(3):
                key = f"s{s}k{k}"
                _add(tar, f"{key}.jpg", f"fake-image-{key}".encode())
                _add(tar, f"{key}.json", json.dumps({"caption": f"cap {key}", "negatives": ["a", "b"]}).encode())
    recs = load_records(str(tmp_path / "shard-{000..001}.tar"))
    assert [r.caption for r in recs] == [f"cap s{s}k{k}" for s in range(2) for k in range(3)]
    assert read_image_bytes(recs[4]) == b"fake-image-s1k1"
    assert recs[4].negatives == ("a", "b")
    with pytest.raises(DataError, match=r"shard-002\.tar does not exist"):
        load_records(str(tmp_path / "shard-{000..002}.tar"))


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "none.json")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unknown format"):
        load_records(tmp_path / "x.parquet")


# ---------------------------------------------------------------- odd files as images (issue 23)


# Every reader of image files, each given an odd path; prints what each raised. Run in a child
# process with 4 GiB of address space: a reader that reads /dev/zero to its end (the old one did)
# ends in a MemoryError there, not in the test machine's memory.
_READERS = """
import sys
from degla_fast.data.dali import read_batch
from degla_fast.data import sources
from degla_fast.data.sources import Record, read_image_bytes
from degla_fast.data.image_cache import open_image
from degla_fast.evaluate.encode import ImageRef, load_image
path, good = sys.argv[1], sys.argv[2]
record = Record(path, "c", (), "r")
for name, read in [("read_image_file", lambda: sources.read_image_file(path)),
                   ("read_image_bytes", lambda: read_image_bytes(record)),
                   ("open_image", lambda: open_image(record)),
                   ("load_image", lambda: load_image(ImageRef(path))),
                   ("dali read_batch", lambda: read_batch([record], [0], seed=0, epoch=0, skip_bad_images=False))]:
    try:
        read()
        print(name, "read it")
    except Exception as err:
        print(name, type(err).__name__, err)
skipped = read_batch([Record(good, "c", (), "g"), record], [0, 1], seed=0, epoch=0, skip_bad_images=True)[3]
print("dali skip kept", [int(k[0]) for k in skipped])
"""


@pytest.mark.parametrize("kind, named", [("fifo", "a FIFO"), ("zero", "a device")])
def test_every_image_reader_refuses_a_fifo_or_a_device(kind, named, tmp_path):
    import os
    import resource
    import subprocess
    import sys

    from PIL import Image

    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo.jpg")  # nobody writes to it: a blocking open waits forever
    path = str(tmp_path / "fifo.jpg") if kind == "fifo" else "/dev/zero"
    Image.new("RGB", (8, 8)).save(tmp_path / "good.jpg")

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    try:
        proc = subprocess.run([sys.executable, "-c", _READERS, path, str(tmp_path / "good.jpg")], text=True,
                              capture_output=True, timeout=60, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} as an image did not end in 60 s (a hang)")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 6, proc.stdout + proc.stderr[-2000:]
    assert lines[0] == lines[1].replace("read_image_bytes", "read_image_file") == \
        f"read_image_file OSError {named}, not a regular file", lines
    for line in lines[2:5]:  # the trainer's, the evaluator's and DALI's one-line error naming the file
        assert f"DataError {path}: cannot read image (" in line and f"{named}, not a regular file)" in line, line
    assert lines[5] == "dali skip kept [0]"


def test_an_image_over_the_byte_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from degla_fast.data import sources

    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 100)
    (tmp_path / "ok.jpg").write_bytes(b"x" * 100)
    assert sources.read_image_file(tmp_path / "ok.jpg") == b"x" * 100
    big = tmp_path / "big.jpg"
    with big.open("wb") as handle:  # sparse: 1 TB on paper, nothing on disk
        handle.truncate(2**40)
    with pytest.raises(OSError, match=r"1099511627776 bytes, over the 100-byte cap of one image"):
        sources.read_image_file(big)
    with pytest.raises(OSError, match=r"101 bytes, over the 100-byte cap"):  # a tar member that claims more
        sources.read_image_file(big, offset=10, size=101)
    assert sources.read_image_file(tmp_path / "ok.jpg", offset=90, size=10) == b"x" * 10
