"""`python -m services.executor`: run an executor replica until SIGTERM."""

import asyncio

from services.executor.service import ExecutorService
from shared.service import serve
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    asyncio.run(serve(ExecutorService(settings), settings, settings.executor_metrics_port))


if __name__ == "__main__":
    main()
