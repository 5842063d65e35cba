"""The `covid_ct` dataset."""
