"""TFDS builder for COVID-CT: `import tfds_covidct` registers the `covid_ct` dataset with `tfds.load`."""

from tfds_covidct.covid_ct.covid_ct_dataset_builder import Builder as CovidCt
from tfds_covidct.covid_ct.covid_ct_dataset_builder import CovidCtError

__all__ = ["CovidCt", "CovidCtError"]

