"""covidct: train, evaluate, export and benchmark a COVID-19 classifier on the COVID-CT dataset."""

__version__ = "0.1.0"
