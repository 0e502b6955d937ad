"""Prompt sets: the shipped published sets say what the reference's prompt files say,
several prompts per class, checks against a dataset's classes, and the errors a user sees."""

from __future__ import annotations

import csv
import io
from importlib import resources

import pytest

from pipeline.datasets.flowers import flower_names
from pipeline.dc import prompts
from pipeline.errors import ConfigError

PUBLISHED = {"aircraft": 100, "cifar10": 10, "cifar100_blurry": 100, "flowers": 102, "food": 101,
             "imagenet": 1000, "mnist": 10, "pets": 37, "stl10": 10}

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10 = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
# Oxford-IIIT Pets in label order; True = cat (the rest are dogs)
PETS = [("Abyssinian", True), ("American Bulldog", False), ("American Pit Bull Terrier", False),
        ("Basset Hound", False), ("Beagle", False), ("Bengal", True), ("Birman", True), ("Bombay", True),
        ("Boxer", False), ("British Shorthair", True), ("Chihuahua", False), ("Egyptian Mau", True),
        ("English Cocker Spaniel", False), ("English Setter", False), ("German Shorthaired", False),
        ("Great Pyrenees", False), ("Havanese", False), ("Japanese Chin", False), ("Keeshond", False),
        ("Leonberger", False), ("Maine Coon", True), ("Miniature Pinscher", False), ("Newfoundland", False),
        ("Persian", True), ("Pomeranian", False), ("Pug", False), ("Ragdoll", True), ("Russian Blue", True),
        ("Saint Bernard", False), ("Samoyed", False), ("Scottish Terrier", False), ("Shiba Inu", False),
        ("Siamese", True), ("Sphynx", True), ("Staffordshire Bull Terrier", False),
        ("Wheaten Terrier", False),
        ("Yorkshire Terrier", False)]


def rows(name):
    text = (resources.files("pipeline.dc") / "prompt_sets" / f"{name}.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def test_every_published_set_is_shipped_one_prompt_per_class_in_class_order():
    assert set(PUBLISHED) <= set(prompts.shipped_sets())
    for name, k in PUBLISHED.items():
        table = rows(name)
        assert list(table[0]) == ["prompt", "classname", "classidx"], name
        assert [int(r["classidx"]) for r in table] == list(range(k)), name


def test_cifar10_and_stl10_templates_as_published():
    assert [r["prompt"] for r in rows("cifar10")] == [f"a blurry photo of a {c}." for c in CIFAR10]
    assert [r["prompt"] for r in rows("stl10")] == [f"a photo of a {c}." for c in STL10]


def test_pets_title_case_with_cat_or_dog():
    expected = []
    for name, is_cat in PETS:
        # the reference adds no " dog" where the breed name already ends in one (American Bulldog)
        suffix = " cat" if is_cat else ("" if name.lower().endswith("dog") else " dog")
        expected.append(f"a photo of a {name}{suffix}, a type of pet.")
    assert [r["prompt"] for r in rows("pets")] == expected
    assert [r["classname"] for r in rows("pets")] == [n.lower() for n, _ in PETS]


def test_mnist_quotes_the_digit():
    assert [r["prompt"] for r in rows("mnist")] == [f"a photo of the number: '{d}'." for d in range(10)]


def test_flowers_prompts_use_the_reader_class_names():
    names = flower_names()
    assert [r["classname"] for r in rows("flowers")] == names
    assert [r["prompt"] for r in rows("flowers")] == [f"a photo of a {n}, a type of flower." for n in names]


def test_food_and_aircraft_templates():
    food = rows("food")
    assert food[0]["prompt"] == "a photo of apple pie, a type of food."
    assert food[0]["classname"] == "apple_pie"
    assert all(r["prompt"] == f"a photo of {r['classname'].replace('_', ' ')}, a type of food." for r in food)
    aircraft = rows("aircraft")
    assert aircraft[73]["prompt"] == "a photo of a F/A-18, a type of aircraft."
    assert aircraft[73]["classname"] == "F_A-18"


def test_a_shipped_set_checked_against_dataset_names():
    pets = prompts.load_prompt_set("pets", None, [n.replace(" ", "_").lower() if not cat else n
                                                  for n, cat in PETS])  # as the pets reader names them
    assert pets.by_class(37)[1] == ["a photo of a American Bulldog, a type of pet."]
    assert pets.check([n for n, _ in PETS]) == []
    flowers = prompts.load_prompt_set("flowers", None, flower_names())
    assert flowers.check(flower_names()) == [] and flowers.source == "shipped:flowers.csv"
    # other names for the same indices are reported (matched by index), not fatal
    renamed = list(flower_names())
    renamed[92] = "ball moss"
    assert prompts.load_prompt_set("flowers", None, renamed).check(renamed) == ["'air plant' vs 'ball moss'"]
    # ImageNet-style names: any comma-separated synonym matches
    assert prompts.read_prompt_csv("prompt,classname,classidx\na photo of a tench.,tench,0\n", "x").check(
        ["tench, Tinca tinca"]) == []


def test_several_prompts_per_class(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,classname,classidx\na cat.,cat,0\n"a dog, barking.",dog,1\na kitten.,cat,0\n')
    got = prompts.load_prompt_set(None, str(path), ["cat", "dog"])
    assert got.prompts == ("a cat.", "a dog, barking.", "a kitten.") and got.class_index == (0, 1, 0)
    assert got.by_class(2) == [["a cat.", "a kitten."], ["a dog, barking."]]
    assert got.source == str(path) and len(got.sha256) == 64


def test_templates_apply_to_reader_names():
    got = prompts.load_prompt_set("an image of {}", None, ["great_pyrenees", "bombay"])
    assert got.prompts == ("an image of great pyrenees", "an image of bombay") and got.class_index == (0, 1)
    cars = prompts.load_prompt_set("cars", None, ["Audi TT"])
    assert cars.prompts == ("a photo of a Audi TT, a type of car.",)
    assert prompts.shipped_templates()["default"] == "a photo of a {}."


@pytest.mark.parametrize("text, names, message", [
    ("prompt,classidx\na.,0\n", ["x", "y"], r"no prompt for 1 of the 2 classes \(e.g. 'y'\)"),
    ("prompt,classidx\na.,0\nb.,5\n", ["x"], r"class indices \[5\] are outside"),
    ("prompt,classidx\na.,0\na.,0\n", ["x"], "repeats line 2"),
    ("text,classidx\na.,0\n", ["x"], "must name the columns prompt and classidx"),
    ("prompt,classidx\na.,zero\n", ["x"], "line 2: classidx 'zero' is not an integer"),
    ("prompt,classidx\n", ["x"], "has no rows"),
])
def test_bad_prompt_files_say_what_to_fix(tmp_path, text, names, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        prompts.load_prompt_set(None, str(path), names)


def test_prompt_choices_are_named():
    with pytest.raises(ConfigError, match="did you mean 'pets'"):
        prompts.load_prompt_set("pet", None, ["x"])
    with pytest.raises(ConfigError, match="needs 'prompt': a published set"):
        prompts.load_prompt_set(None, None, ["x"])
    with pytest.raises(ConfigError, match="not both"):
        prompts.resolve("pets", "p.csv")
    with pytest.raises(ConfigError, match="does not exist"):
        prompts.load_prompt_set(None, "/nonexistent/p.csv", ["x"])
