"""Admission tests get a nats-server of their own: the session's whole-stack fixture runs
an admission replica in the same queue group on the session's server, which would answer
some of these tests' requests."""

import pytest

from tests.conftest import running_nats


@pytest.fixture(scope="package")
def admission_nats(tmp_path_factory: pytest.TempPathFactory):
    with running_nats(tmp_path_factory.mktemp("admission-nats")) as server:
        yield server


@pytest.fixture(scope="package")
def settings(settings, admission_nats):
    """The session's settings, pointed at the admission tests' own nats-server."""
    return settings.model_copy(update={"nats_url": admission_nats.url})
