"""The encoder pretraining domain: subjects held out, captions without identity, leave-one-out batches."""
import pytest
import torch

from nbutils import domain
from nbutils.toyworld import SUBJECTS


def test_domain_identities_are_distinct_seeded_and_never_a_subject():
    people = domain.domain_identities(0, 300)
    assert len(set(people)) == 300
    assert not set(people) & set(SUBJECTS.values())
    assert people == domain.domain_identities(0, 300)
    assert people != domain.domain_identities(1, 300)
    assert {p.hair_colour for p in people} >= {"purple"} and {p.mark for p in people} == {"none", "star"}


def test_render_domain_shapes_and_captions_name_only_the_placeholder():
    ds = domain.render_domain(3, people=4, photos_per_person=3, size=32)
    assert ds.images.shape == (4, 3, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert (ds.people, ds.photos_per_person) == (4, 3)
    for ident, row in zip(ds.identities, ds.captions):
        for text in row:
            assert domain.PLACEHOLDER in text and ident.hair_colour not in text and ident.face not in text
    x = ds.pixels(torch.tensor([0, 3]), torch.tensor([2, 1]))
    assert x.shape == (2, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    again = domain.render_domain(3, 4, 3, 32)
    assert again.captions == ds.captions and again.identities == ds.identities
    # PIL's filters are not bit-exact between calls on every style (seen: a few pixels off by up to 4 of 255)
    assert (again.images.int() - ds.images.int()).abs().float().mean() < 0.5


def test_leave_one_out_references_are_other_photos_of_the_same_person():
    g = torch.Generator().manual_seed(0)
    person, target, refs = domain.leave_one_out(g, people=10, photos_per_person=5, batch=256, refs=3)
    assert person.shape == target.shape == (256,) and refs.shape == (256, 3)
    assert int(person.max()) < 10 and int(refs.max()) < 5
    assert not (refs == target[:, None]).any()
    assert all(len(set(row.tolist())) == 3 for row in refs)
    assert len(set(target.tolist())) == 5  # every photo is a target sometimes


def test_domain_identities_refuses_more_people_than_the_world_has():
    assert len(domain.domain_identities(0, 808)) == 808  # 810 identities, the 2 subjects held out
    with pytest.raises(ValueError, match="808 identities besides the subjects"):
        domain.domain_identities(0, 809)


def test_leave_one_out_rejects_as_many_references_as_photos():
    with pytest.raises(ValueError, match="refs must be in 1..4"):
        domain.leave_one_out(torch.Generator(), 10, 5, 8, refs=5)
