"""`python -m services.artifacts`: run the artifacts service until SIGTERM."""

import asyncio

from services.artifacts.service import ArtifactsService
from shared.service import serve
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    asyncio.run(serve(ArtifactsService(settings), settings, settings.artifacts_metrics_port))


if __name__ == "__main__":
    main()
