"""Response models of the face routes: what /openapi.json promises for every face answer.

They are the face service's typed results (app/services/results.py), re-exported here for the routers: the service
builds them, so a field it sets without declaring it there is a validation error in the tests, never a silent
change of the API. Optional fields it does not set stay absent (the routes answer with response_model_exclude_unset).
"""

from __future__ import annotations

from app.services.results import Box as Box
from app.services.results import Candidate as Candidate
from app.services.results import Decision as Decision
from app.services.results import DeletedFace as DeletedFace
from app.services.results import DeletedSubject as DeletedSubject
from app.services.results import DetectedFace as DetectedFace
from app.services.results import Duplicate as Duplicate
from app.services.results import EmbeddedFace as EmbeddedFace
from app.services.results import EmbedResponse as EmbedResponse
from app.services.results import EnrolledFace as EnrolledFace
from app.services.results import EnrolLimits as EnrolLimits
from app.services.results import EnrollResponse as EnrollResponse
from app.services.results import Eyes as Eyes
from app.services.results import FaceQuality as FaceQuality
from app.services.results import GalleryStats as GalleryStats
from app.services.results import IdentifiedFace as IdentifiedFace
from app.services.results import IdentifyResponse as IdentifyResponse
from app.services.results import ImageEmbeddings as ImageEmbeddings
from app.services.results import ModelInfo as ModelInfo
from app.services.results import StoredFace as StoredFace
from app.services.results import SubjectDetail as SubjectDetail
from app.services.results import SubjectsPage as SubjectsPage
from app.services.results import SubjectSummary as SubjectSummary
from app.services.results import VerifiedFace as VerifiedFace
from app.services.results import VerifyResponse as VerifyResponse
