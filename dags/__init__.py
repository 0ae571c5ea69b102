"""Airflow DAGs that run recap stages and kick off training; see issue 7."""
