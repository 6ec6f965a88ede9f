"""Unit conversions, a module of the ``station`` program."""


def celsius_to_fahrenheit(celsius):
    return celsius * 9 / 5 + 32


def hpa_to_inhg(hpa):
    return hpa * 0.02953
