import pytest

from ep_jit.units import format_age, format_size, parse_age, parse_size


@pytest.mark.parametrize("text, size", [
    ("2G", 2 * 10**9), ("500M", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5k", 1500), ("10 MiB", 10 * 2**20),
    ("2gb", 2 * 10**9), ("123", 123), ("123B", 123), ("1T", 10**12),
])
def test_sizes_are_decimal_unless_written_binary(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2Q", "-1G", "", "G", "2 G B"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="expected a size like 500M, 2G"):
        parse_size(text)


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45),
                                           ("2w", 2 * 604800), ("1.5h", 5400)])
def test_ages_take_a_unit(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["30", "forever", "30x", "d"])
def test_bare_numbers_are_not_ages(text):
    with pytest.raises(ValueError, match="expected an age with a unit"):
        parse_age(text)


def test_sizes_and_ages_are_written_in_the_same_units():
    assert [format_size(n) for n in (999, 1000, 42_163, 2_100_000_000)] == ["999 B", "1 kB", "42.2 kB", "2.1 GB"]
    assert parse_size(format_size(2_100_000_000).replace(" ", "")) == 2_100_000_000
    assert [format_age(s) for s in (5, 120, 7200, 3 * 86400, 21 * 86400)] == ["5s", "2m", "2h", "3d", "3w"]
