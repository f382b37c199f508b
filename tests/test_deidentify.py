"""De-identification engine: recipe rules, pseudonyms, dates, UIDs and verification."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from workbench.deidentify import (
    DeidentificationOptions,
    build_deidentifier,
    collect_identifiers,
    deidentify_instance,
    load_recipe,
    recipe_paths,
)
from workbench.deidentify.engine import age_between, burned_in_reason, cap_age
from workbench.deidentify.pseudonyms import (
    Pseudonymizer,
    normalise_person_name,
    patient_key,
)
from workbench.deidentify.verify import find_leaks
from workbench.errors import RecipeError, VerificationError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def make_instance(**overrides: object) -> Dataset:
    """Return a small CT instance with invented identities in common places."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1.3"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1.3"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1.1.2"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1.9"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN-4711"
    ds.PatientBirthDate = "19700215"
    ds.PatientSex = "F"
    ds.PatientAge = "052Y"
    ds.PatientWeight = 61.5
    ds.StudyDate = "20220310"
    ds.SeriesDate = "20220310"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-99812"
    ds.InstitutionName = "SAINT ELSEWHERE HOSPITAL"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.OperatorsName = "NURSE^RATCHED"
    ds.StudyDescription = "CT CHEST FOR DOE JANE"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME MEDICAL"
    ds.ManufacturerModelName = "SCANMASTER 9000"
    ds.KVP = 120
    ds.SliceThickness = 1.25
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100, -100, 50]
    ds.InstanceNumber = 3
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1.4"
    ds.ReferencedImageSequence = Sequence([item])
    request = Dataset()
    request.AccessionNumber = "ACC-99812"
    request.RequestingPhysician = "WHO^DOCTOR"
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", "MRN-4711")
    block.add_new(0x11, "PN", "DOE^JANE")
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module")
def deidentifier():
    return build_deidentifier(KEY)


def test_identity_replaced_by_one_pseudonym(deidentifier):
    ds = make_instance()
    deidentify_instance(ds, deidentifier)
    assert str(ds.PatientName) == ds.PatientID
    assert ds.PatientID.startswith("WB")
    assert ds.PatientID != "MRN-4711"


def test_pseudonym_is_stable_across_runs_and_keys():
    first = build_deidentifier(KEY)
    second = build_deidentifier(KEY)
    other = build_deidentifier(OTHER_KEY)
    a, b, c = make_instance(), make_instance(), make_instance()
    deidentify_instance(a, first)
    deidentify_instance(b, second)
    deidentify_instance(c, other)
    assert a.PatientID == b.PatientID
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.PatientID != c.PatientID
    assert a.StudyInstanceUID != c.StudyInstanceUID


def test_uids_mapped_consistently_in_sequences(deidentifier):
    referencing = make_instance()
    referenced = make_instance(SOPInstanceUID="1.2.826.0.1.3680043.8.498.1.1.4")
    deidentify_instance(referencing, deidentifier)
    deidentify_instance(referenced, deidentifier)
    reference = referencing.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == referenced.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == CTImageStorage
    assert referencing.StudyInstanceUID == referenced.StudyInstanceUID
    assert referencing.SOPInstanceUID.startswith("2.25.")
    assert referencing.SOPClassUID == CTImageStorage


def test_file_meta_matches_new_sop_instance_uid(deidentifier):
    ds = make_instance()
    deidentify_instance(ds, deidentifier)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_dates_shifted_keep_intervals(deidentifier):
    first = make_instance(StudyDate="20220310", SeriesDate="20220310")
    second = make_instance(StudyDate="20220401", SeriesDate="20220402")
    deidentify_instance(first, deidentifier)
    deidentify_instance(second, deidentifier)

    def day(value: str) -> dt.date:
        return dt.datetime.strptime(value, "%Y%m%d").date()

    assert first.StudyDate != "20220310"
    assert (day(second.StudyDate) - day(first.StudyDate)).days == 22
    assert (day(second.SeriesDate) - day(second.StudyDate)).days == 1
    # Times of day are kept; only whole days move.
    assert first.StudyTime == "101500"


def test_shift_is_per_patient():
    pseudonyms = Pseudonymizer(KEY)
    shifts = {pseudonyms.date_shift_days(f"id:|P{i}") for i in range(50)}
    assert len(shifts) > 40
    assert all(-365 <= shift <= -31 for shift in shifts)


def test_research_attributes_kept(deidentifier):
    ds = make_instance()
    deidentify_instance(ds, deidentifier)
    assert ds.Modality == "CT"
    assert ds.Manufacturer == "ACME MEDICAL"
    assert ds.ManufacturerModelName == "SCANMASTER 9000"
    assert ds.PatientSex == "F"
    assert ds.PatientAge == "052Y"
    assert float(ds.PatientWeight) == 61.5
    assert float(ds.KVP) == 120
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
    assert [float(v) for v in ds.ImagePositionPatient] == [-100, -100, 50]
    assert ds.InstanceNumber == 3


def test_identifying_attributes_removed(deidentifier):
    ds = make_instance()
    deidentify_instance(ds, deidentifier)
    assert "InstitutionName" not in ds
    assert "OperatorsName" not in ds
    assert "StudyDescription" not in ds
    assert ds.AccessionNumber == ""
    assert ds.ReferringPhysicianName == ""
    assert ds.PatientBirthDate == ""
    assert "RequestAttributesSequence" not in ds


def test_private_tags_removed_unless_allowed(deidentifier):
    ds = make_instance()
    siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    siemens.add_new(0x0C, "IS", 1000)
    siemens.add_new(0x0D, "LO", "MRN-4711")
    deidentify_instance(ds, deidentifier)
    private = [element.tag for element in ds if element.tag.is_private]
    assert 0x0019100C in private
    assert 0x0019100D not in private
    assert all(tag >> 16 != 0x0029 for tag in private)
    assert ds[0x0019100C].value == 1000


def test_deidentification_method_recorded(deidentifier):
    ds = make_instance()
    deidentify_instance(ds, deidentifier)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes[:3] == ["113100", "113107", "113108"]
    assert all(
        item.CodingSchemeDesignator == "DCM"
        for item in ds.DeidentificationMethodCodeSequence
    )
    assert any("Basic" in text for text in ds.DeidentificationMethod)


def test_clean_descriptors_option_keeps_cleaned_text():
    deidentifier = build_deidentifier(
        KEY, DeidentificationOptions(clean_descriptors=True)
    )
    ds = make_instance(StudyDescription="CT CHEST DOE JANE 2022-03-10 MRN-4711")
    deidentify_instance(ds, deidentifier)
    assert ds.StudyDescription.startswith("CT CHEST")
    assert "DOE" not in ds.StudyDescription
    assert "JANE" not in ds.StudyDescription
    assert "MRN-4711" not in ds.StudyDescription
    assert "2022" not in ds.StudyDescription
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert "113105" in codes


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        ("052Y", "052Y"),
        ("089Y", "089Y"),
        ("090Y", "090Y"),
        ("104Y", "090Y"),
        ("011M", "011M"),
        ("999M", "999M"),
        ("012W", "012W"),
        ("", ""),
        ("52Y", None),
        ("052X", None),
    ],
)
def test_cap_age(age, expected):
    assert cap_age(age) == expected


def test_age_over_89_capped(deidentifier):
    ds = make_instance(PatientAge="093Y")
    deidentify_instance(ds, deidentifier)
    assert ds.PatientAge == "090Y"


def test_age_derived_from_birth_date():
    assert age_between("19700215", "20220310") == "052Y"
    assert age_between("19200101", "20220310") == "090Y"
    assert age_between("20211201", "20220310") == "003M"
    assert age_between("bad", "20220310") is None


def test_patient_key_ignores_trailing_carets():
    assert normalise_person_name("DOE^JANE^") == normalise_person_name("doe^jane")
    assert patient_key("", "DOE^JANE^^", "19700215") == patient_key(
        "", "DOE^JANE", "19700215"
    )
    assert patient_key(" MRN-1 ") == patient_key("MRN-1")
    assert patient_key("MRN-1") != patient_key("MRN-2")


def test_issuer_does_not_split_a_patient(deidentifier):
    first = make_instance(IssuerOfPatientID="HOSPITAL A")
    second = make_instance(IssuerOfPatientID="Hospital A MPI")
    deidentify_instance(first, deidentifier)
    deidentify_instance(second, deidentifier)
    assert first.PatientID == second.PatientID


def test_burned_in_reasons():
    assert burned_in_reason(make_instance(Modality="US")) is not None
    assert (
        burned_in_reason(make_instance(Modality="US", BurnedInAnnotation="NO")) is None
    )
    assert burned_in_reason(make_instance(BurnedInAnnotation="YES")) is not None
    assert burned_in_reason(make_instance()) is None


def test_verification_finds_surviving_name(deidentifier):
    source = make_instance()
    identifiers = collect_identifiers(source, deidentifier)
    leaked = copy.deepcopy(source)
    deidentifier.deidentify(leaked, deidentifier.context_for(leaked, identifiers))
    nested = Dataset()
    nested.CodeMeaning = "seen by jane doe"
    leaked.ProcedureCodeSequence = Sequence([nested])
    findings = find_leaks(leaked, identifiers)
    assert ("person name", "ProcedureCodeSequence[0].CodeMeaning") in findings


def test_verification_finds_surviving_date_and_uid(deidentifier):
    source = make_instance()
    identifiers = collect_identifiers(source, deidentifier)
    leaked = copy.deepcopy(source)
    deidentifier.deidentify(leaked, deidentifier.context_for(leaked, identifiers))
    leaked.ContentDate = "20220310"
    leaked.IrradiationEventUID = "1.2.826.0.1.3680043.8.498.1.1"
    with pytest.raises(VerificationError) as error:
        deidentifier_verify(leaked, identifiers)
    kinds = {kind for kind, _ in error.value.findings}
    assert kinds == {"date", "UID"}
    assert "20220310" not in str(error.value)


def deidentifier_verify(ds, identifiers):
    from workbench.deidentify import verify

    verify(ds, identifiers)


def test_verification_message_has_no_values(deidentifier):
    source = make_instance()
    identifiers = collect_identifiers(source, deidentifier)
    source.PatientComments = "DOE^JANE"
    with pytest.raises(VerificationError) as error:
        deidentifier_verify(source, identifiers)
    assert "DOE" not in str(error.value)
    assert "MRN-4711" not in str(error.value)


def test_recipe_rejects_unknown_keyword(tmp_path):
    recipe = tmp_path / "bad.dicom"
    recipe.write_text("FORMAT dicom\n%header\nREMOVE NotAKeyword\n")
    with pytest.raises(RecipeError, match="NotAKeyword"):
        load_recipe([recipe])


def test_recipe_rejects_unknown_function(tmp_path):
    recipe = tmp_path / "bad.dicom"
    recipe.write_text("FORMAT dicom\n%header\nREPLACE PatientID func:nope\n")
    with pytest.raises(RecipeError, match="func:nope"):
        build_deidentifier(KEY, recipe=load_recipe([recipe, *recipe_paths()]))


def test_recipe_without_format_rejected(tmp_path):
    recipe = tmp_path / "bad.dicom"
    recipe.write_text("%header\nREMOVE PatientID\n")
    with pytest.raises(RecipeError, match="FORMAT dicom"):
        load_recipe([recipe])


def test_extra_recipe_takes_precedence(tmp_path):
    recipe = tmp_path / "keep-institution.dicom"
    recipe.write_text("FORMAT dicom\n%header\nKEEP InstitutionName\n")
    deidentifier = build_deidentifier(
        KEY, recipe=load_recipe([recipe, *recipe_paths()])
    )
    ds = make_instance(InstitutionName="GENERAL")
    deidentify_instance(ds, deidentifier)
    assert ds.InstitutionName == "GENERAL"


def test_recipe_digest_changes_with_text(tmp_path):
    base = load_recipe(recipe_paths())
    recipe = tmp_path / "extra.dicom"
    recipe.write_text("FORMAT dicom\n%header\nKEEP InstitutionName\n")
    assert load_recipe([recipe, *recipe_paths()]).digest != base.digest
    assert load_recipe(recipe_paths()).digest == base.digest


def test_recipe_rejects_unknown_action(tmp_path):
    recipe = tmp_path / "typo.dicom"
    recipe.write_text("FORMAT dicom\n%header\nFROBNICATE PatientName\n")
    with pytest.raises(RecipeError, match="line 3"):
        load_recipe([recipe])


def test_unlisted_descriptions_removed(deidentifier):
    ds = make_instance(ContentDescription="Segmentation by DR WHO at ST ELSEWHERE")
    ds.ContentLabel = "ST ELSEWHERE"
    deidentify_instance(ds, deidentifier)
    assert "ContentDescription" not in ds
    assert "ContentLabel" not in ds
