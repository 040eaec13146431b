"""Text from uploaded files (PDF, DOCX, XLSX, PPTX, CSV, TXT/MD, PNG/JPEG by OCR), in a resource-limited child
process: `extract(path, filename, limits) -> Extracted`, or ExtractionError with a reason code."""

from glmstack.knowledge.extraction.results import (
    SUPPORTED_EXTENSIONS,
    Extracted,
    ExtractionError,
    ExtractionLimits,
)
from glmstack.knowledge.extraction.sandbox import extract

__all__ = ["SUPPORTED_EXTENSIONS", "Extracted", "ExtractionError", "ExtractionLimits", "extract"]
