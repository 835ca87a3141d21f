"""Every answer of the application routes is described in /openapi.json: a JSON schema (a response model) for each
success, or the image media types of the style results."""

from __future__ import annotations

from typing import Any

from app.main import create_app
from app.settings import Settings

APPLICATION_PREFIXES = ("/classify", "/text/", "/faces/", "/style-transfer")


def _successes(op: dict[str, Any]) -> dict[str, Any]:
    return {code: r for code, r in op["responses"].items() if code.startswith("2")}


def test_every_application_route_documents_its_answers(base_settings: Settings) -> None:
    schema = create_app(base_settings).openapi()
    checked = 0
    for path, ops in schema["paths"].items():
        if not path.startswith(APPLICATION_PREFIXES):
            continue
        for method, op in ops.items():
            successes = _successes(op)
            assert successes, (method, path)
            for code, response in successes.items():
                if code == "204":
                    assert "content" not in response, (method, path)
                    continue
                content = response.get("content") or {}
                if "application/json" in content:
                    ref = content["application/json"].get("schema", {}).get("$ref", "")
                    # a named model, not the empty schema of an untyped answer
                    assert ref.startswith("#/components/schemas/"), (method, path, code, content)
                else:
                    assert content and all(t.startswith("image/") for t in content), (method, path, code, content)
            checked += 1
    assert checked == 17  # classify, text, nine face routes, six style routes


def test_the_services_answer_with_the_schemas_clients_know(base_settings: Settings) -> None:
    """The services' result classes keep the schema names of /openapi.json (the routers re-export them)."""
    from app.api import face_schemas, schemas, style, text
    from app.services import results

    names = set(create_app(base_settings).openapi()["components"]["schemas"])
    for cls in (results.ClassifyResponse, results.TextClassifyResponse, results.EmbedResponse, results.VerifyResponse,
                results.EnrollResponse, results.IdentifyResponse, results.SubjectsPage, results.SubjectDetail,
                results.DeletedSubject, results.DeletedFace, results.GalleryStats, results.StyleJob,
                results.StyleJobList):
        assert cls.__name__ in names
    assert schemas.ClassifyResponse is results.ClassifyResponse
    assert text.TextClassifyResponse is results.TextClassifyResponse
    assert face_schemas.VerifyResponse is results.VerifyResponse and style.StyleJob is results.StyleJob
