"""`python -m services.admission`: run the admission service until SIGTERM or SIGINT."""

import asyncio

from services.admission.service import AdmissionService
from shared.service import serve
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    asyncio.run(serve(AdmissionService(settings), settings, settings.admission_metrics_port))


if __name__ == "__main__":
    main()
