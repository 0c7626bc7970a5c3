"""Image names and tags against the OCI distribution spec / Docker reference grammar."""

from __future__ import annotations

import pytest

from builder import tags

GOOD_REPOSITORIES = [
    "builder", "builder/torch", "example/ml/torch", "a", "a0/b-c/d__e/f.g", "a--b", "a---b",
    "registry.example.com/ml/torch", "registry.example.com:5000/ml", "localhost/x", "localhost:5000/x",
    "127.0.0.1:5000/x", "[::1]:5000/x", "Registry.Example.com/x", "a" * 255,
]
BAD_REPOSITORIES = [
    ("", "cannot be empty"), ("Builder", "path component"), ("builder/", "path component"),
    ("/builder", "path component"), ("a//b", "path component"), ("a_-b", "path component"),
    ("a.", "path component"), ("_a", "path component"), ("a___b", "path component"), ("a..b", "path component"),
    ("a b", "path component"), ("a\nb", "path component"), ("a\x1b[2Jb", "path component"),
    ("\uff42uilder", "path component"), ("builder/\u0663", "path component"), ("a" * 256, "too long"),
    ("x/" * 200 + "y", "too long"), ("host:port/x", "registry host"), ("-host.com/x", "registry host"),
    ("host.com:99999999/x", "registry host"), ("a:b", "path component"),
]


@pytest.mark.parametrize("name", GOOD_REPOSITORIES)
def test_valid_repositories(name):
    assert tags.repository_problem(name) is None


@pytest.mark.parametrize(("name", "why"), BAD_REPOSITORIES)
def test_invalid_repositories_say_why_on_one_short_line(name, why):
    problem = tags.repository_problem(name)
    assert problem is not None and why in problem
    assert "\n" not in problem and "\x1b" not in problem and len(problem) < 250


@pytest.mark.parametrize("tag", ["latest", "2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12", "_x", "A" * 128, "v1.0_rc-2"])
def test_valid_tags(tag):
    assert tags.tag_problem(tag) is None


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a:b", "a/b", "a b", "a\nb", "A" * 129, "\u0663.\u0661\u0661", "\uff12.\uff14.\uff11", "x" * 5000])
def test_invalid_tags(tag):
    problem = tags.tag_problem(tag)
    assert problem is not None and "\n" not in problem and len(problem) < 250


def test_image_name_checks_and_raises():
    assert str(tags.image_name("builder/torch", "2.4.1")) == "builder/torch:2.4.1"
    with pytest.raises(tags.InvalidName, match="too long"):
        tags.image_name("a" * 300, "x")
    with pytest.raises(tags.InvalidName, match="tag"):
        tags.image_name("builder", "-x")


def test_cell_tag_composition():
    assert tags.cell_tag(version="2.4.1", cuda="12.1", cudnn="9.1.0.70", python="3.11", flavor="runtime",
                         base="debian12") == "2.4.1-cuda12.1-cudnn9.1-py3.11-runtime-debian12"
    assert tags.cell_tag(version="2.4.1", cuda=None, cudnn=None, python="3.11", flavor="runtime",
                         base="debian12") == "2.4.1-cpu-py3.11-runtime-debian12"


@pytest.mark.parametrize("ref", ["builder/torch:2.4.1-cpu", "a" * 255 + ":" + "b" * 128, "a" * 255 + ":" + "c" * 128,
                                 ".hidden:x"])
def test_file_names_are_short_safe_and_distinct(ref):
    name = tags.file_name(ref)
    assert len(name.encode()) <= tags.MAX_FILE_NAME and not name.startswith(".")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert tags.file_name("a" * 255 + ":" + "b" * 128) != tags.file_name("a" * 255 + ":" + "c" * 128)
